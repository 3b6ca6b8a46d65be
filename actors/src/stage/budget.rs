//! A stage's restart budget: how many workers it may replace in a window
//! before the pipeline fails.

use std::collections::VecDeque;
use std::time::Instant;

use crate::config::RestartBudget;

/// Replacements within the budget's window.
pub(super) struct Budget {
    budget: Option<RestartBudget>,
    /// When workers were replaced, within the window.
    restarts: VecDeque<Instant>,
    /// The budget was exceeded: no more replacements.
    exceeded: bool,
}

/// A replacement the budget does not allow.
pub(super) struct OverBudget {
    /// Replacements within the window, this one included.
    pub(super) restarts: u32,
    pub(super) budget: RestartBudget,
}

impl Budget {
    pub(super) fn new(budget: Option<RestartBudget>) -> Self {
        Budget {
            budget,
            restarts: VecDeque::new(),
            exceeded: false,
        }
    }

    /// Counts a replacement at `now`. `Err(Some(..))` the first time the
    /// budget is exceeded (the caller fails the pipeline), `Err(None)` for
    /// every replacement after that.
    pub(super) fn replace(&mut self, now: Instant) -> Result<(), Option<OverBudget>> {
        let Some(budget) = self.budget else {
            return Ok(());
        };
        if self.exceeded {
            return Err(None);
        }
        while self
            .restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > budget.window)
        {
            self.restarts.pop_front();
        }
        self.restarts.push_back(now);
        let restarts = self.restarts.len() as u32;
        if restarts <= budget.max_restarts {
            return Ok(());
        }
        self.exceeded = true;
        Err(Some(OverBudget { restarts, budget }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn replacements_beyond_the_budget_within_its_window_are_refused_once_and_for_all() {
        let mut budget = Budget::new(Some(RestartBudget::new(2, Duration::from_secs(10))));
        let t0 = Instant::now();
        assert!(budget.replace(t0).is_ok());
        assert!(budget.replace(t0 + Duration::from_secs(1)).is_ok());
        // The first one left the window: room again.
        assert!(budget.replace(t0 + Duration::from_secs(11)).is_ok());
        match budget.replace(t0 + Duration::from_secs(11)) {
            Err(Some(over)) => assert_eq!(over.restarts, 3),
            _ => panic!("over budget"),
        }
        assert!(matches!(
            budget.replace(t0 + Duration::from_secs(60)),
            Err(None)
        ));
        assert!(Budget::new(None).replace(t0).is_ok());
    }
}
