"""What the DICOM edge accepts: storage SOP classes and transfer syntaxes.

One list shared by the SCP (presentation contexts it accepts), the SCU (what ``lisplugin send``
produces) and the conformance statement test, so the three cannot drift apart. A transfer
syntax is only listed when the installed decoders turn it into pixels (tests/test_dicom_scp.py
round-trips each one): accepting an instance we cannot read would only fail later, after the
sender was told Success.
"""

from __future__ import annotations

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    VLMicroscopicImageStorage,
    VLSlideCoordinatesMicroscopicImageStorage,
    VLWholeSlideMicroscopyImageStorage,
)

#: Storage SOP classes accepted as SCP; anything else is refused at association negotiation.
STORAGE_SOP_CLASSES: tuple[UID, ...] = (
    VLMicroscopicImageStorage,
    VLSlideCoordinatesMicroscopicImageStorage,
    VLWholeSlideMicroscopyImageStorage,
    SecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
)

#: Transfer syntaxes accepted for every storage SOP class, in order of preference.
TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

#: Uncompressed syntaxes: a dataset in one of them can be sent in any other without loss.
UNCOMPRESSED_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
