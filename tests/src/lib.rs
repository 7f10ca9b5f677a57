//! Shared harness for hearth's integration tests.

pub mod node;

use hearth_host::agents::AgentClient;
use hearth_protocol::{Endpoint, Secret};
use std::path::PathBuf;
use std::sync::Arc;

/// An agent served in-process on a unix socket in a private temp dir. Dropping it stops
/// the server task and removes the directory.
pub struct TestAgent {
    pub dir: tempfile::TempDir,
    pub endpoint: Endpoint,
    pub secret: Secret,
    pub agent: Arc<hearth_agent::Agent>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TestAgent {
    pub async fn start() -> TestAgent {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("agent.sock");
        let endpoint = Endpoint::Unix(path);
        let secret = Secret(rand::random());
        let agent = hearth_agent::Agent::new(secret.clone());
        let listener = endpoint.listen().await.expect("listen");
        let task = tokio::spawn(hearth_agent::server::serve(listener, agent.clone()));
        TestAgent {
            dir,
            endpoint,
            secret,
            agent,
            task,
        }
    }

    /// Stops the server (closing every connection, as if the agent died) and starts a new
    /// one on the same socket with the same secret after `down_for`.
    pub async fn restart(&mut self, down_for: std::time::Duration) {
        self.task.abort();
        let _ = (&mut self.task).await;
        tokio::time::sleep(down_for).await;
        let listener = self.endpoint.listen().await.expect("listen again");
        self.agent = hearth_agent::Agent::new(self.secret.clone());
        self.task = tokio::spawn(hearth_agent::server::serve(listener, self.agent.clone()));
    }

    pub fn client(&self) -> Arc<AgentClient> {
        AgentClient::new(self.endpoint.clone(), self.secret.clone())
    }

    /// A scratch path inside the agent's temp dir.
    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }

    pub fn socket(&self) -> PathBuf {
        match &self.endpoint {
            Endpoint::Unix(p) => p.clone(),
            other => panic!("test agents listen on unix sockets, not {other}"),
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}
