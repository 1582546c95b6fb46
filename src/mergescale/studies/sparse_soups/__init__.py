"""studies/sparse_soups"""
