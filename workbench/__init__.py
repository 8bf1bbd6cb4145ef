"""MoE Vision Workbench: dense ViT, V-MoE and Mobile V-MoE, with the super-class pipeline."""
__version__ = "0.1.0"
