"""Streamlit entry point: `streamlit run workbench/app.py`.

Declares the pages (the top-level `pages/` folder; paths are relative to this
file) with `st.navigation`. Every page is a thin script over `workbench/` and
`analysis/`; shared widgets and caches live in `pages/common.py`. Server
settings (localhost only, upload cap, no usage statistics) come from
`workbench/.streamlit/config.toml`, read beside this file from any working
directory; `workbench.serving` refuses to serve if they were lost.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `streamlit run` puts workbench/ on the path, not the repo root
    sys.path.insert(0, str(ROOT))

import streamlit as st

from workbench.serving import unsafe_server_settings

st.set_page_config(page_title="MoE Vision Workbench", page_icon=":material/hub:", layout="wide")
if problems := unsafe_server_settings():
    message = ("This server was started with unsafe settings and will not serve the workbench: "
               + "; ".join(problems) + ". Start it with `streamlit run workbench/app.py` next to "
               "workbench/.streamlit/config.toml, or pass e.g. `--server.address 0.0.0.0` explicitly to share it.")
    print(message, file=sys.stderr)
    st.error(message)
    st.stop()

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
