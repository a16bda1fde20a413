//! The period a quota counts in: one rule for both planes, in the model crate.

pub use tollgate_model::period::{Period, calendar_month, current};
