//! A linear flow of tasks, as in Cinder's taskflow: each task can execute and
//! revert; when one fails, the tasks that finished revert in reverse order,
//! and the failure (with any revert failures) is kept as the reason.

use std::fmt;

/// Why a task failed, and whether another node could do better.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskError {
    pub code: tonic::Code,
    pub message: String,
    /// True when the failure belongs to the node tried (full, down, broken
    /// pool), so the request may be rescheduled elsewhere.
    pub reschedulable: bool,
    /// True when the outcome is not known yet (a node that may still be
    /// working, or cannot be asked): nothing is reverted, the state stays as
    /// it is for a retry or the reconciler to finish.
    pub pending: bool,
}

impl TaskError {
    pub fn new(code: tonic::Code, message: impl Into<String>) -> Self {
        TaskError { code, message: message.into(), reschedulable: false, pending: false }
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

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.message)
    }
}

#[tonic::async_trait]
pub trait Task<C: Send>: Send + Sync {
    fn name(&self) -> &'static str;
    async fn execute(&self, ctx: &mut C) -> Result<(), TaskError>;
    /// Undo what `execute` did; `cause` is the failure that stopped the flow.
    async fn revert(&self, _ctx: &mut C, _cause: &TaskError) -> Result<(), TaskError> {
        Ok(())
    }
}

/// The outcome of a failed flow: which task failed, why, and what could not
/// be undone.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowFailure {
    pub flow: &'static str,
    pub task: &'static str,
    pub error: TaskError,
    pub revert_errors: Vec<(&'static str, TaskError)>,
}

impl fmt::Display for FlowFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed at {}: {}", self.flow, self.task, self.error)?;
        for (task, e) in &self.revert_errors {
            write!(f, "; revert of {task} also failed: {e}")?;
        }
        Ok(())
    }
}

pub struct Flow<C: Send> {
    name: &'static str,
    tasks: Vec<Box<dyn Task<C>>>,
}

impl<C: Send> Flow<C> {
    pub fn new(name: &'static str) -> Self {
        Flow { name, tasks: Vec::new() }
    }

    pub fn then(mut self, task: impl Task<C> + 'static) -> Self {
        self.tasks.push(Box::new(task));
        self
    }

    pub async fn run(&self, ctx: &mut C) -> Result<(), FlowFailure> {
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
    impl Task<Vec<String>> for Step {
        fn name(&self) -> &'static str {
            self.name
        }
        async fn execute(&self, log: &mut Vec<String>) -> Result<(), TaskError> {
            log.push(format!("do {}", self.name));
            if self.fail {
                Err(TaskError::new(tonic::Code::Internal, format!("{} broke", self.name)))
            } else {
                Ok(())
            }
        }
        async fn revert(&self, log: &mut Vec<String>, cause: &TaskError) -> Result<(), TaskError> {
            log.push(format!("undo {} ({})", self.name, cause.message));
            if self.fail_revert {
                Err(TaskError::new(tonic::Code::Internal, "cannot undo"))
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
        assert_eq!(failure.error.message, "c broke");
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
