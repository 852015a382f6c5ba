"""adrel.models"""
