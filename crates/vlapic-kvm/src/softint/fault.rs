//! The exceptions a software-interrupt delivery can raise, their vectors and error
//! codes, and how a second one combines with the first (SDM Vol. 3A Table 6-5).

/// An exception raised while delivering (the `int` instruction then faults: RIP
/// stays on it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// #DF (error code 0).
    Df,
    /// #TS with this error code.
    Ts(u16),
    /// #NP with this error code.
    Np(u16),
    /// #SS with this error code.
    Ss(u16),
    /// #GP with this error code.
    Gp(u16),
    /// #PF at this linear address with this error code.
    Pf {
        /// CR2.
        addr: u64,
        /// Error code (P, W/R, U/S, ...).
        code: u32,
    },
}

impl Fault {
    /// The exception vector.
    pub fn vector(self) -> u8 {
        match self {
            Fault::Df => 8,
            Fault::Ts(_) => 10,
            Fault::Np(_) => 11,
            Fault::Ss(_) => 12,
            Fault::Gp(_) => 13,
            Fault::Pf { .. } => 14,
        }
    }

    /// The error code pushed with it.
    pub fn error_code(self) -> u32 {
        match self {
            Fault::Df => 0,
            Fault::Gp(c) | Fault::Np(c) | Fault::Ss(c) | Fault::Ts(c) => u32::from(c),
            Fault::Pf { code, .. } => code,
        }
    }

    /// Contributory exceptions (SDM Vol. 3A Table 6-4; #DE never arises here).
    pub(crate) fn contributory(self) -> bool {
        matches!(
            self,
            Fault::Ts(_) | Fault::Np(_) | Fault::Ss(_) | Fault::Gp(_)
        )
    }

    /// What the CPU delivers when `next` arises while delivering `self` (SDM Vol. 3A
    /// Table 6-5): #DF for contributory-then-contributory and for a #PF followed by a
    /// contributory fault or another #PF; `None` after #DF (shutdown); else `next`.
    pub(crate) fn then(self, next: Fault) -> Option<Fault> {
        match self {
            Fault::Df => None,
            Fault::Pf { .. } if next.contributory() || matches!(next, Fault::Pf { .. }) => {
                Some(Fault::Df)
            }
            f if f.contributory() && next.contributory() => Some(Fault::Df),
            _ => Some(next),
        }
    }
}
