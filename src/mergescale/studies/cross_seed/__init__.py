"""studies/cross_seed"""
