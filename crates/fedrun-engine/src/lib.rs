//! fedrun client job engine.
