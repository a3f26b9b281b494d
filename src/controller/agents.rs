//! gRPC clients for the node agents, one lazily connected channel per address.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::agent_proto::volume_manager_client::VolumeManagerClient;

pub type AgentClient = VolumeManagerClient<Channel>;

pub struct Agents {
    channels: Mutex<HashMap<String, Channel>>,
    call_timeout: Duration,
}

impl Agents {
    pub fn new(call_timeout: Duration) -> Self {
        Agents { channels: Mutex::new(HashMap::new()), call_timeout }
    }

    pub fn client(&self, address: &str) -> Result<AgentClient, tonic::Status> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(address) {
            return Ok(VolumeManagerClient::new(c.clone()));
        }
        let endpoint = Endpoint::from_shared(address.to_string())
            .map_err(|e| tonic::Status::internal(format!("node agent address {address:?} is not a URL: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(self.call_timeout);
        let channel = endpoint.connect_lazy();
        channels.insert(address.to_string(), channel.clone());
        Ok(VolumeManagerClient::new(channel))
    }
}
