//! One file per method, each holding the method's client half and server half. The asynchronous
//! methods (FedAsync, FedBuff, FedFix, FedCompass) hold the server step; when and with which
//! weight their updates are folded is the business of their schedulers.

pub mod fedasync;
pub mod fedavg;
pub mod fedavg_m;
pub mod fedavgm;
pub mod fedbuff;
pub mod fedcompass;
pub mod fedfix;
pub mod scafcom;
pub mod scaffold;
pub mod scaffold_m;
pub mod scallion;
