"""adrel.pipeline"""
