"""Learning to Be a Transformer to Pinpoint Anomalies: a high-resolution Teacher-Student model for anomalib.

Example:
    >>> from anomalib_transformer_student import TransformerStudent
    >>> model = TransformerStudent(pretrained=False, image_size=224)
"""

from .lightning_model import TransformerStudent
from .registration import register_with_anomalib
from .torch_model import TransformerStudentModel

register_with_anomalib()

__all__ = ["TransformerStudent", "TransformerStudentModel"]
