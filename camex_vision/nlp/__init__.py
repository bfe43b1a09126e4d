"""CAMEx for transformers language models: GPT-2 and T5 through the same merge core.

Importing this package imports transformers (the optional ``nlp`` extra); ``import camex_vision`` does not.

    from camex_vision.nlp import camexify, from_pretrained
    camexify(model, num_experts=8, merge='camex', mask='ties', segment_length=256)  # in place, exact upcycling
"""
from .convert import SUPPORTED_MODELS, camex_options, camexify, init_experts_independently, is_camexified
from .persistence import from_pretrained, reparameterize
from .routing import ModelRouting, RoutedCAMExGatedMlp, RoutedCAMExMlp, StackRouting
from .tokenizer import ByteTokenizer
