//! NVFlare's FOBS payload codec.
