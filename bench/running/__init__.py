"""Running a sweep: suites -> cells -> schedule -> executor (local or Ray) -> runner -> store."""
