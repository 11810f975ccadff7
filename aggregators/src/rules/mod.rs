//! One file per method, each holding the method's client half and server half.

pub mod fedavg;
pub mod fedavg_m;
pub mod fedavgm;
pub mod scafcom;
pub mod scaffold;
pub mod scaffold_m;
pub mod scallion;
