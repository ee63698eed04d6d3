"""The TransformerStudent model, laid out like anomalib's own models (``anomalib/models/image/l2bt``).

Importing this package registers the model with anomalib (see :mod:`.registration`).

Example:
    >>> from anomalib_transformer_student.model import TransformerStudent
    >>> TransformerStudent(pretrained=False, image_size=224).model.teacher.grid_size
    (16, 16)
"""

from .lightning_model import TransformerStudent
from .registration import register_with_anomalib
from .torch_model import TransformerStudentModel

register_with_anomalib(TransformerStudent)

__all__ = ["TransformerStudent", "TransformerStudentModel"]
