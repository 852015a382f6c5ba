"""adrel.serving"""
