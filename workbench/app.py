"""Streamlit entry point: `streamlit run workbench/app.py` (placeholder until the app issue lands)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `streamlit run` puts workbench/ on the path, not the repo root
    sys.path.insert(0, str(ROOT))

import streamlit as st

st.set_page_config(page_title="MoE Vision Workbench", layout="wide")
st.title("MoE Vision Workbench")
st.info("The workbench pages are being built. The models are in `workbench/models/`; "
        "see README.md for what works today.")
