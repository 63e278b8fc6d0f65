//! NVFlare CellNet cells for fedrun.
