//! A linear flow of tasks, as in Cinder's taskflow: each task can execute and
//! revert; when one fails, the tasks that finished revert in reverse order,
//! and the failure (with any revert failures) is kept as the reason.
//!
//! The flow is generic over its domain's error `E` (the controller's is
//! `ControllerError`); it never decides what an error means for a caller.

use std::fmt;

/// Why a task failed, and whether another node could do better.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskError<E> {
    pub error: E,
    /// True when the failure belongs to the node tried (full, down, broken
    /// pool), so the request may be rescheduled elsewhere.
    pub reschedulable: bool,
    /// True when the outcome is not known yet (a node that may still be
    /// working, or cannot be asked): nothing is reverted, the state stays as
    /// it is for a retry or the reconciler to finish.
    pub pending: bool,
}

impl<E> TaskError<E> {
    pub fn new(error: E) -> Self {
        TaskError { error, reschedulable: false, pending: false }
    }
    pub fn reschedulable(mut self) -> Self {
        self.reschedulable = true;
        self
    }
    pub fn pending(mut self) -> Self {
        self.pending = true;
        self
    }
}

/// A domain error is a task's failure as it is (neither reschedulable nor pending).
impl<E> From<E> for TaskError<E> {
    fn from(error: E) -> Self {
        TaskError::new(error)
    }
}

impl<E: fmt::Display> fmt::Display for TaskError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.error)
    }
}

#[tonic::async_trait]
pub trait Task<C: Send, E: Send + Sync>: Send + Sync {
    fn name(&self) -> &'static str;
    async fn execute(&self, ctx: &mut C) -> Result<(), TaskError<E>>;
    /// Undo what `execute` did; `cause` is the failure that stopped the flow.
    async fn revert(&self, _ctx: &mut C, _cause: &TaskError<E>) -> Result<(), TaskError<E>> {
        Ok(())
    }
}

/// The outcome of a failed flow: which task failed, why, and what could not
/// be undone.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowFailure<E> {
    pub flow: &'static str,
    pub task: &'static str,
    pub error: TaskError<E>,
    pub revert_errors: Vec<(&'static str, TaskError<E>)>,
}

impl<E: fmt::Display> fmt::Display for FlowFailure<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed at {}: {}", self.flow, self.task, self.error)?;
        for (task, e) in &self.revert_errors {
            write!(f, "; revert of {task} also failed: {e}")?;
        }
        Ok(())
    }
}

pub struct Flow<C: Send, E: Send + Sync> {
    name: &'static str,
    tasks: Vec<Box<dyn Task<C, E>>>,
}

impl<C: Send, E: Send + Sync + fmt::Display> Flow<C, E> {
    pub fn new(name: &'static str) -> Self {
        Flow { name, tasks: Vec::new() }
    }

    pub fn then(mut self, task: impl Task<C, E> + 'static) -> Self {
        self.tasks.push(Box::new(task));
        self
    }

    pub async fn run(&self, ctx: &mut C) -> Result<(), FlowFailure<E>> {
        for (i, task) in self.tasks.iter().enumerate() {
            if let Err(error) = task.execute(ctx).await {
                if error.pending {
                    tracing::warn!(flow = self.name, task = task.name(), error = %error, "outcome not known yet; left as it is for a retry");
                    return Err(FlowFailure { flow: self.name, task: task.name(), error, revert_errors: vec![] });
                }
                tracing::warn!(flow = self.name, task = task.name(), error = %error, "task failed, reverting");
                crate::metrics::METRICS.flow_reverts.get_or_create(&crate::metrics::FlowLabels { flow: self.name.to_string() }).inc();
                let mut revert_errors = Vec::new();
                for done in self.tasks[..i].iter().rev() {
                    if let Err(e) = done.revert(ctx, &error).await {
                        tracing::error!(flow = self.name, task = done.name(), error = %e, "revert failed");
                        revert_errors.push((done.name(), e));
                    }
                }
                return Err(FlowFailure { flow: self.name, task: task.name(), error, revert_errors });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Step {
        name: &'static str,
        fail: bool,
        fail_revert: bool,
    }

    #[tonic::async_trait]
    impl Task<Vec<String>, String> for Step {
        fn name(&self) -> &'static str {
            self.name
        }
        async fn execute(&self, log: &mut Vec<String>) -> Result<(), TaskError<String>> {
            log.push(format!("do {}", self.name));
            if self.fail {
                Err(TaskError::new(format!("{} broke", self.name)))
            } else {
                Ok(())
            }
        }
        async fn revert(&self, log: &mut Vec<String>, cause: &TaskError<String>) -> Result<(), TaskError<String>> {
            log.push(format!("undo {} ({})", self.name, cause.error));
            if self.fail_revert {
                Err(TaskError::new("cannot undo".to_string()))
            } else {
                Ok(())
            }
        }
    }

    fn step(name: &'static str) -> Step {
        Step { name, fail: false, fail_revert: false }
    }

    #[tokio::test]
    async fn all_tasks_run_in_order() {
        let flow = Flow::new("f").then(step("a")).then(step("b")).then(step("c"));
        let mut log = vec![];
        flow.run(&mut log).await.unwrap();
        assert_eq!(log, ["do a", "do b", "do c"]);
    }

    #[tokio::test]
    async fn failure_reverts_finished_tasks_in_reverse_and_keeps_the_reason() {
        let flow = Flow::new("f")
            .then(step("a"))
            .then(Step { fail_revert: true, ..step("b") })
            .then(Step { fail: true, ..step("c") })
            .then(step("d"));
        let mut log = vec![];
        let failure = flow.run(&mut log).await.unwrap_err();
        assert_eq!(log, ["do a", "do b", "do c", "undo b (c broke)", "undo a (c broke)"]);
        assert_eq!(failure.task, "c");
        assert_eq!(failure.error.error, "c broke");
        assert_eq!(failure.revert_errors.len(), 1);
        assert_eq!(failure.revert_errors[0].0, "b");
        assert!(failure.to_string().contains("revert of b also failed"));
    }

    #[tokio::test]
    async fn the_failing_task_itself_is_not_reverted() {
        let flow = Flow::new("f").then(Step { fail: true, ..step("only") });
        let mut log = vec![];
        flow.run(&mut log).await.unwrap_err();
        assert_eq!(log, ["do only"]);
    }
}
