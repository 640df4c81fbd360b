"""Certified robustness: randomized smoothing, denoised smoothing (first- and zeroth-order), bound propagation."""

from robustlab.certification.bounds import BoundResult, margin_bounds, verify
from robustlab.certification.denoised import (
    DenoisedClassifier,
    DenoisedConfig,
    DenoiserTrainResult,
    denoised_oracle,
    train_denoiser,
    train_denoiser_zo,
)
from robustlab.certification.denoisers import (
    ConvDecoder,
    ConvEncoder,
    DenoiserBundle,
    DnCNN,
    FitConfig,
    autoencoder,
    load_denoiser,
    save_denoiser,
    train_autoencoder,
    train_denoiser_mse,
)
from robustlab.certification.report import bounds_section, smoothing_section, verified_vs_empirical
from robustlab.certification.smoothing import (
    ABSTAIN,
    Certificate,
    RandomizedSmoothing,
    certified_accuracy,
    clopper_pearson_lower,
)

__all__ = [
    "ABSTAIN",
    "BoundResult",
    "Certificate",
    "ConvDecoder",
    "ConvEncoder",
    "DenoisedClassifier",
    "DenoisedConfig",
    "DenoiserBundle",
    "DenoiserTrainResult",
    "DnCNN",
    "FitConfig",
    "RandomizedSmoothing",
    "autoencoder",
    "bounds_section",
    "certified_accuracy",
    "clopper_pearson_lower",
    "denoised_oracle",
    "load_denoiser",
    "margin_bounds",
    "save_denoiser",
    "smoothing_section",
    "train_autoencoder",
    "train_denoiser",
    "train_denoiser_mse",
    "train_denoiser_zo",
    "verified_vs_empirical",
    "verify",
]
