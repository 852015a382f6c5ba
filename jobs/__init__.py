"""adrel.jobs"""
