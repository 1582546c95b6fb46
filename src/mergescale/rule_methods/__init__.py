"""rule_methods"""
