"""c3diff.models: the C3-Diff networks, their losses, sampling, presets and Hub persistence.

The package exports what a user needs (``__all__``: the model, its presets, persistence, the demo model, the
individual diffusion samples). The modules are private (``_``-prefixed, as in scanpy): their contents may change
between releases. The building blocks of the model, for research on the method, are imported from the private
module that defines them (e.g. ``from c3diff.models._losses import content_loss``). Where things live:

============================  ==========================================================================
module                        content
============================  ==========================================================================
``_presets``                  ``paper`` / ``tiny`` configs and :func:`build_model`
``_autoencoder``              first stage (diffusers ``VQModel``): build, loss, scaling factor
``_controlnet``               ``UNet2DControlNetModel``, the UNet forward with residuals
``_hint_encoders``            the four hint encoders, gene code, LR conditioning image, ST augmentation
``_losses``                   ``L_content``, ``L_modal``, ``L_inter-sphere``, ``L_mse``, ``L_overall``
``_training_config``          :class:`TrainingConfig`, the training recipe (``training_config.json``)
``_imputation``               ST features of samples without LR ST (batch and memory bank)
``_conditional_mean``         the conditional-mean stage: network, block shares, count likelihoods
``_c3diff``                   :class:`C3DiffModel`, the composite model (training losses, predict)
``_sampling``                 the mean and diffusion samples (tiles x genes x samples)
``_hub``                      save / load / push, :func:`from_ldm`, the registry of loadable model classes
``_model_card``               the README.md model card
``_bundled``                  the demo model shipped in the package
============================  ==========================================================================

Examples
--------
>>> import c3diff
>>> model = c3diff.models.build_model("tiny", genes=["EPCAM", "PTPRC"], scale=10)
>>> model.config.image_size, model.config.scale
(64, 10)
"""

from c3diff.models._bundled import demo_model_path, load_demo_model
from c3diff.models._c3diff import C3DiffModel
from c3diff.models._hub import from_ldm, from_pretrained, push_to_hub, save_pretrained
from c3diff.models._losses import LossWeights
from c3diff.models._presets import PRESETS, build_model, preset_config
from c3diff.models._sampling import draw_samples
from c3diff.models._training_config import TrainingConfig

# isort: split
# For c3diff's other subpackages (c3diff.tl, the demo): they import these from `c3diff.models`, never from its private
# modules (tests/test_structure.py). Not user API: not in `__all__`, not documented, changed without notice.
from c3diff.models._autoencoder import autoencoder_loss as autoencoder_loss
from c3diff.models._autoencoder import estimate_scaling_factor as estimate_scaling_factor
from c3diff.models._bundled import MODEL_CHOICES as MODEL_CHOICES
from c3diff.models._bundled import warn_demo_on_real_data as warn_demo_on_real_data
from c3diff.models._c3diff import config_kwargs as config_kwargs
from c3diff.models._conditional_mean import block_pixel_counts as block_pixel_counts
from c3diff.models._hub import warn_ignored_revision as warn_ignored_revision
from c3diff.models._sampling import auto_gene_batch_size as auto_gene_batch_size

# What a user needs: the model, its presets, its loss weights (`c3diff.tl.train(loss_weights=...)`) and training
# recipe, persistence, the bundled demo model and the individual diffusion samples (`draw_samples`:
# `C3DiffModel.predict` and `c3.tl.super_resolve` give only their mean and spread). The networks, losses and helpers
# are imported from the private modules that define them (table above), e.g. `from c3diff.models._losses import
# content_loss`.
__all__ = [
    "PRESETS",
    "C3DiffModel",
    "LossWeights",
    "TrainingConfig",
    "build_model",
    "demo_model_path",
    "draw_samples",
    "from_ldm",
    "from_pretrained",
    "load_demo_model",
    "preset_config",
    "push_to_hub",
    "save_pretrained",
]
