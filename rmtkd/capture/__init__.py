"""Reduction sites and calibration: which activations to analyse, and their streaming
covariance statistics gathered with forward hooks."""
from .sites import (SITE_TYPES, CalibrationError, NonFiniteActivationError, Site, find_sites,
                    make_site, split_batch)
from .stream import (collect_accumulators, collect_statistics, distinct_inputs,
                     pooled_statistics, site_features)

__all__ = [
    "Site", "SITE_TYPES", "find_sites", "make_site", "split_batch", "site_features",
    "collect_accumulators", "collect_statistics", "distinct_inputs", "pooled_statistics",
    "CalibrationError",
    "NonFiniteActivationError",
]
