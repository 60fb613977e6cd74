//! The training run's random numbers: the project's one generator, re-exported where the
//! trainer and the data pipeline name it.
pub use ftrt_runtime::rng::SplitMix64;
