"""c3diff.models: the C3-Diff networks, their losses, sampling, presets and Hub persistence.

Where things live:

============================  ==========================================================================
module                        content
============================  ==========================================================================
``presets``                   ``paper`` / ``tiny`` configs and :func:`build_model`
``autoencoder``               first stage (diffusers ``VQModel``): build, loss, :func:`fit_autoencoder`
``controlnet``                :class:`UNet2DControlNetModel` and the UNet forward with residuals
``hint_encoders``             the four hint encoders, gene code, LR conditioning image, ST augmentation
``losses``                    ``L_content``, ``L_modal``, ``L_inter-sphere``, ``L_mse``, ``L_overall``
``imputation``                ST features of samples without LR ST (batch and memory bank)
``conditional_mean``          the conditional-mean stage: network, block shares, count likelihoods
``c3diff``                    :class:`C3DiffModel`, the composite model (training losses, predict)
``sampling``                  the mean and diffusion samples (tiles x genes x samples)
``hub``                       save / load / push, :func:`from_ldm`
``model_card``                the README.md model card
============================  ==========================================================================

Examples
--------
>>> import c3diff
>>> model = c3diff.models.build_model("tiny", genes=["EPCAM", "PTPRC"], scale=10)
>>> model.config.image_size, model.config.scale
(64, 10)
"""

from c3diff.models.autoencoder import autoencoder_loss, build_autoencoder, fit_autoencoder
from c3diff.models.bundled import demo_model_path, load_demo_model
from c3diff.models.c3diff import C3DiffModel
from c3diff.models.conditional_mean import ConditionalMeanNet, multinomial_nll, poisson_nll
from c3diff.models.controlnet import UNet2DControlNetModel, unet_forward_with_residuals
from c3diff.models.hint_encoders import (
    HintEncoder,
    HintEncoders,
    gene_code_map,
    lr_condition_image,
    sphere_noise_augment,
)
from c3diff.models.hub import from_ldm, from_pretrained, push_to_hub, save_pretrained
from c3diff.models.imputation import FeatureImputer, impute_features
from c3diff.models.losses import (
    LossOutput,
    LossWeights,
    content_loss,
    diffusion_mse,
    inter_sphere_loss,
    modal_loss,
    overall_loss,
)
from c3diff.models.model_card import make_model_card
from c3diff.models.presets import PRESETS, build_model, preset_config

__all__ = [
    "PRESETS",
    "C3DiffModel",
    "ConditionalMeanNet",
    "FeatureImputer",
    "HintEncoder",
    "HintEncoders",
    "LossOutput",
    "LossWeights",
    "UNet2DControlNetModel",
    "autoencoder_loss",
    "build_autoencoder",
    "build_model",
    "content_loss",
    "demo_model_path",
    "diffusion_mse",
    "fit_autoencoder",
    "from_ldm",
    "from_pretrained",
    "gene_code_map",
    "impute_features",
    "inter_sphere_loss",
    "load_demo_model",
    "lr_condition_image",
    "make_model_card",
    "modal_loss",
    "multinomial_nll",
    "overall_loss",
    "poisson_nll",
    "preset_config",
    "push_to_hub",
    "save_pretrained",
    "sphere_noise_augment",
    "unet_forward_with_residuals",
]
