//! NVFlare CellNet wire for fedrun.
