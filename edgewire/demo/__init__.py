"""The demo: models and frames built from scikit-learn's digits, the whole system run on embedded
defaults, and the threshold replay that picks the judge's setting from labelled data.

Nothing in the core or in a component depends on it; benches and tests use its artefacts.
"""
