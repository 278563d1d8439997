pub mod linalg;
pub mod nn;
