//! Where endpoints come from. The router only ever reads the current set through
//! [`Discovery`]; static flags today, Kubernetes Pods later, behind the same trait.

use tokio::sync::watch;

use crate::endpoint::EndpointSpec;

/// A source of endpoints.
///
/// Implementations must keep the receiver's value equal to the full current set (not a
/// delta) and change it whenever the set changes; the router keeps the state of endpoints
/// that stay and drops the state of endpoints that go.
pub trait Discovery: Send + Sync + 'static {
    /// The current set, and its future changes.
    fn subscribe(&self) -> watch::Receiver<Vec<EndpointSpec>>;
}

/// A fixed set given on the command line. [`StaticDiscovery::set`] replaces it, which tests
/// use to add and remove endpoints while the router runs.
#[derive(Debug)]
pub struct StaticDiscovery {
    tx: watch::Sender<Vec<EndpointSpec>>,
}

impl StaticDiscovery {
    /// Discovery that always answers `endpoints`.
    #[must_use]
    pub fn new(endpoints: Vec<EndpointSpec>) -> Self {
        Self { tx: watch::Sender::new(endpoints) }
    }

    /// Replaces the set.
    pub fn set(&self, endpoints: Vec<EndpointSpec>) {
        self.tx.send_replace(endpoints);
    }
}

impl Discovery for StaticDiscovery {
    fn subscribe(&self) -> watch::Receiver<Vec<EndpointSpec>> {
        self.tx.subscribe()
    }
}
