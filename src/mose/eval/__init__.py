"""Evaluation: generation with skill chains, benchmark scorers, analysis and reports.

A layer over the library: mose itself never imports it.
"""
