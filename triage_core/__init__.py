"""cxr-triage core: imaging, models, inference, Grad-CAM, priority, DICOM output, worklist.

Nothing is built at import time; heavy stacks (torch, highdicom, pytorch_grad_cam, sqlalchemy)
are imported by the submodules that need them.
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
