"""adrel.features"""
