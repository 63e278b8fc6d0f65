//! fedrun server job.
