import streamlit as st; st.info("The Train page is being built.")
