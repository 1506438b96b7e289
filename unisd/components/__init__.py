"""UniSD components: one file per component, registered in ``registry("component")``.

Importing this package registers the built-in components; see
:mod:`unisd.components.base` for the protocol and docs/unisd.md for adding one.
"""
from unisd.components.base import (COMPONENTS, NEEDS, Component, Targets, build_components,  # noqa: F401
                                   components_table, register_component)
from unisd.reduction import sequence_mean  # noqa: F401
from unisd.components import (divergence_clipping, ema_teacher, feature_matching, in_context_teacher,  # noqa: F401
                              multi_teacher_agreement, token_contrastive)
