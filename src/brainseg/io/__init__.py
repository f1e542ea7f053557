"""Reading and writing what users bring and keep: datasets, NIfTI / BraTS volumes, DICOM, DICOMweb, channel semantics, atomic files."""
