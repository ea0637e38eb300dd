"""Data files shipped with the package: the committed MTD split and the offline plot template."""
