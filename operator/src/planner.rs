//! The planner: every decision the control plane makes, as a pure function.
