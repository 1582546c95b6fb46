"""One module per merge-method family; each registers its methods on import.

`mergescale.merge` imports every module in this package (see `merge/__init__.py`), so
adding a method is adding a file here.
"""
