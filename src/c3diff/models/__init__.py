"""c3diff.models: the C3-Diff networks, their losses, sampling, presets and Hub persistence.

The package exports what a user needs (``__all__``: the model, its presets, persistence, the demo model); the
building blocks are imported from the module that defines them. Where things live:

============================  ==========================================================================
module                        content
============================  ==========================================================================
``presets``                   ``paper`` / ``tiny`` configs and :func:`build_model`
``autoencoder``               first stage (diffusers ``VQModel``): build, loss, scaling factor
``controlnet``                :class:`~.controlnet.UNet2DControlNetModel`, the UNet forward with residuals
``hint_encoders``             the four hint encoders, gene code, LR conditioning image, ST augmentation
``losses``                    ``L_content``, ``L_modal``, ``L_inter-sphere``, ``L_mse``, ``L_overall``
``training_config``           :class:`TrainingConfig`, the training recipe (``training_config.json``)
``imputation``                ST features of samples without LR ST (batch and memory bank)
``conditional_mean``          the conditional-mean stage: network, block shares, count likelihoods
``c3diff``                    :class:`C3DiffModel`, the composite model (training losses, predict)
``sampling``                  the mean and diffusion samples (tiles x genes x samples)
``hub``                       save / load / push, :func:`from_ldm`
``model_card``                the README.md model card
``bundled``                   the demo model shipped in the package
============================  ==========================================================================

Examples
--------
>>> import c3diff
>>> model = c3diff.models.build_model("tiny", genes=["EPCAM", "PTPRC"], scale=10)
>>> model.config.image_size, model.config.scale
(64, 10)
"""

from c3diff.models.bundled import demo_model_path, load_demo_model
from c3diff.models.c3diff import C3DiffModel
from c3diff.models.hub import from_ldm, from_pretrained, push_to_hub, save_pretrained
from c3diff.models.losses import LossWeights
from c3diff.models.presets import PRESETS, build_model, preset_config
from c3diff.models.training_config import TrainingConfig

# What a user needs: the model, its presets, its loss weights (`c3diff.tl.train(loss_weights=...)`) and training
# recipe, persistence and the bundled demo model. The networks, losses and helpers are imported from the modules
# that define them (table above), e.g. `from c3diff.models.losses import content_loss`.
__all__ = [
    "PRESETS",
    "C3DiffModel",
    "LossWeights",
    "TrainingConfig",
    "build_model",
    "demo_model_path",
    "from_ldm",
    "from_pretrained",
    "load_demo_model",
    "preset_config",
    "push_to_hub",
    "save_pretrained",
]
