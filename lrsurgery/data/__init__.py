"""Training and calibration data: files and hub datasets turned into token examples; the offline data packages."""
