"""Streamlit entry point: `streamlit run workbench/app.py`.

Declares the pages (the top-level `pages/` folder; paths are relative to this
file) with `st.navigation`. Every page is a thin script over `workbench/` and
`analysis/`; shared widgets and caches live in `pages/common.py`.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `streamlit run` puts workbench/ on the path, not the repo root
    sys.path.insert(0, str(ROOT))

import streamlit as st

st.set_page_config(page_title="MoE Vision Workbench", page_icon=":material/hub:", layout="wide")

PAGES = {
    "Explore": [
        st.Page("../pages/overview.py", title="Overview", icon=":material/info:", default=True),
        st.Page("../pages/confusion_graph.py", title="Confusion graph", icon=":material/share:"),
        st.Page("../pages/superclasses.py", title="Super-classes", icon=":material/category:"),
        st.Page("../pages/hierarchy.py", title="Super-classes vs hierarchy", icon=":material/account_tree:"),
        st.Page("../pages/routing.py", title="Routing", icon=":material/alt_route:"),
        st.Page("../pages/history.py", title="Routing over training", icon=":material/timeline:"),
        st.Page("../pages/inspector.py", title="Image inspector", icon=":material/image_search:"),
        st.Page("../pages/experts.py", title="Expert gallery", icon=":material/photo_library:"),
        st.Page("../pages/tradeoff.py", title="Accuracy vs MACs", icon=":material/scatter_plot:"),
    ],
    "Build": [
        st.Page("../pages/train.py", title="Train", icon=":material/model_training:"),
    ],
    "Learn": [
        st.Page("../pages/learn.py", title="Learn MoE", icon=":material/school:"),
    ],
}

st.navigation(PAGES).run()
