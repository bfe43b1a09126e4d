"""Model creation for the scripts: name checks, MoE options, and timm errors turned into clear messages."""
import difflib
import os
from typing import Any, Dict, Optional, Tuple

import timm
from timm.models import get_pretrained_cfg_value
from torch import nn

from ..core.mlp import MoEModule
from .checkpoint import load_checkpoint_file
from .errors import InputError


def check_model_name(name: str) -> None:
    """Raises ``InputError`` (with close matches) unless ``name`` is a registered timm model."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.5)
    hint = f'; did you mean {", ".join(close)}?' if close else '; `timm.list_models("*camex*")` lists the CAMEx models'
    raise InputError(f'unknown model {name!r}{hint}')


def is_camex_name(name: str) -> bool:
    """Whether a registered model name is one of this package's MoE models (they take the MoE kwargs)."""
    return 'camex' in name.split('.')[0]


def has_moe(model: nn.Module) -> bool:
    return any(isinstance(m, MoEModule) for m in model.modules())


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def state_dict_num_classes(name: str, state_dict: Dict[str, Any]) -> Optional[int]:
    """Classifier outputs of a state dict of model ``name``, found through the model's default ``pretrained_cfg``."""
    try:
        classifier = get_pretrained_cfg_value(name, 'classifier') or 'head'
    except RuntimeError:  # no pretrained cfg registered
        classifier = 'head'
    for key in (classifier if isinstance(classifier, (list, tuple)) else (classifier,)):
        weight = state_dict.get(f'{key}.weight', state_dict.get(f'module.{key}.weight'))
        if weight is not None:
            return int(weight.shape[0])
    return None


def create_model(
        name: str,
        num_classes: Optional[int],
        in_chans: int = 3,
        img_size: Optional[int] = None,
        pretrained: bool = False,
        pretrained_path: str = '',
        model_kwargs: Optional[Dict[str, Any]] = None,
        balance_coef: Optional[float] = None,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """``timm.create_model`` for the scripts; returns the model and the kwargs that rebuild it.

    ``img_size`` is passed to models that take it (ViT, Swin) and dropped for the others; ``balance_coef`` is given to
    CAMEx models (a ``balance_coef`` in ``model_kwargs`` wins). ``pretrained_path`` loads pretrained weights from a
    local file through timm's ``pretrained_cfg_overlay`` (so dense checkpoints are upcycled by the model's filter);
    it implies ``pretrained``, and the file's classifier is kept when its class count matches ``num_classes``.
    ``num_classes=None`` keeps the model's default head.

    The returned kwargs (``img_size``, ``balance_coef`` and ``model_kwargs``; not ``num_classes``, ``in_chans`` or
    pretrained settings) rebuild the architecture with ``timm.create_model(name, num_classes=..., in_chans=...)``.

    Raises:
        InputError: unknown model, options the model does not take, invalid MoE options, unreadable weights.
    """
    check_model_name(name)
    kwargs: Dict[str, Any] = dict(model_kwargs or {})
    if balance_coef is not None and is_camex_name(name):
        kwargs.setdefault('balance_coef', balance_coef)
    factory_kwargs: Dict[str, Any] = {}
    if pretrained_path:
        if not os.path.isfile(pretrained_path):
            raise InputError(f'--pretrained-path {pretrained_path} does not exist')
        overlay = dict(file=os.path.abspath(pretrained_path))
        file_classes = state_dict_num_classes(name, load_checkpoint_file(pretrained_path)['state_dict'])
        if file_classes is not None:
            overlay['num_classes'] = file_classes
        factory_kwargs['pretrained_cfg_overlay'] = overlay
        pretrained = True
    with_size = dict(kwargs)
    if img_size is not None:
        with_size.setdefault('img_size', img_size)

    if num_classes is not None:
        factory_kwargs['num_classes'] = num_classes

    def build(kw):
        return timm.create_model(name, pretrained=pretrained, in_chans=in_chans, **factory_kwargs, **kw)

    try:
        try:
            return build(with_size), with_size
        except TypeError as e:
            if 'img_size' not in str(e) or 'img_size' in kwargs:
                raise
            return build(kwargs), kwargs
    except TypeError as e:
        raise InputError(f'model {name!r} does not accept these options ({e}); check --model-kwargs') from e
    except (ValueError, AssertionError) as e:
        raise InputError(f'invalid options for model {name!r}: {e}') from e
    except (RuntimeError, OSError) as e:
        if not pretrained:
            raise
        what = f'pretrained weights {pretrained_path}' if pretrained_path else f'pretrained weights of {name!r}'
        raise InputError(f'cannot load {what}: {str(e).strip().splitlines()[0]}') from e
