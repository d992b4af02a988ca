//! Which connection pool serves each site. Sites that name the same
//! upstream share its pool, and a reload keeps the pools of upstreams that
//! are still configured (when the connect timeout did not change), so
//! their warm connections carry on.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::DynamicConfig;
use crate::proxy::pool::UpstreamPool;

/// The pools of one configuration, keyed like its sites.
pub struct Upstreams {
    by_host: HashMap<String, Arc<UpstreamPool>>,
}

impl Upstreams {
    /// `previous` is the configuration being replaced and its pools.
    pub fn new(config: &DynamicConfig, previous: Option<(&DynamicConfig, &Upstreams)>) -> Self {
        let mut pools: Vec<Arc<UpstreamPool>> = match previous {
            Some((old, upstreams)) if old.proxy.connect_timeout == config.proxy.connect_timeout => {
                upstreams.by_host.values().cloned().collect()
            }
            _ => Vec::new(),
        };
        let by_host = config
            .sites
            .iter()
            .map(|(host, site)| {
                let authority = &site.upstream.authority;
                let pool = match pools.iter().find(|p| p.authority() == authority) {
                    Some(pool) => Arc::clone(pool),
                    None => {
                        let pool = UpstreamPool::new(&site.upstream, config.proxy.connect_timeout);
                        pools.push(Arc::clone(&pool));
                        pool
                    }
                };
                (host.clone(), pool)
            })
            .collect();
        Self { by_host }
    }

    /// The pool for a lower-cased host without a port; `None` when no site
    /// is configured for it.
    pub fn get(&self, host: &str) -> Option<&Arc<UpstreamPool>> {
        self.by_host.get(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn dynamic(connect_timeout: u64, sites: &[(&str, &str)]) -> DynamicConfig {
        let mut text = format!(
            "[server]\nbind_addr = \"127.0.0.1:0\"\n[server.tls]\nmode = \"off\"\n\
             [proxy]\nconnect_timeout_secs = {connect_timeout}\n"
        );
        for (host, upstream) in sites {
            text.push_str(&format!(
                "[[sites]]\nhost = \"{host}\"\nupstream = \"{upstream}\"\n"
            ));
        }
        Config::parse(&text).expect("config").dynamic
    }

    fn same(a: &Upstreams, host_a: &str, b: &Upstreams, host_b: &str) -> bool {
        Arc::ptr_eq(a.get(host_a).expect("pool"), b.get(host_b).expect("pool"))
    }

    #[test]
    fn sites_naming_one_upstream_share_its_pool() {
        let config = dynamic(
            5,
            &[
                ("a.test", "http://127.0.0.1:3000"),
                ("b.test", "http://127.0.0.1:3000/"),
                ("c.test", "http://127.0.0.1:3001"),
            ],
        );
        let upstreams = Upstreams::new(&config, None);
        assert!(same(&upstreams, "a.test", &upstreams, "b.test"));
        assert!(!same(&upstreams, "a.test", &upstreams, "c.test"));
        assert!(upstreams.get("d.test").is_none());
    }

    #[test]
    fn a_reload_keeps_the_pools_of_upstreams_still_configured() {
        let old = dynamic(
            5,
            &[
                ("a.test", "http://127.0.0.1:3000"),
                ("b.test", "http://127.0.0.1:3001"),
            ],
        );
        let old_upstreams = Upstreams::new(&old, None);
        // b.test moves to a.test's upstream; c.test is new on an old one.
        let new = dynamic(
            5,
            &[
                ("a.test", "http://127.0.0.1:3000"),
                ("b.test", "http://127.0.0.1:3000"),
                ("c.test", "http://127.0.0.1:3001"),
                ("d.test", "http://127.0.0.1:3002"),
            ],
        );
        let upstreams = Upstreams::new(&new, Some((&old, &old_upstreams)));
        assert!(same(&upstreams, "a.test", &old_upstreams, "a.test"));
        assert!(same(&upstreams, "b.test", &old_upstreams, "a.test"));
        assert!(same(&upstreams, "c.test", &old_upstreams, "b.test"));
        assert_eq!(
            upstreams.get("d.test").expect("pool").authority(),
            "127.0.0.1:3002"
        );
        // A changed connect timeout gives new pools, so that every
        // connection is opened with it.
        let slower = dynamic(9, &[("a.test", "http://127.0.0.1:3000")]);
        let rebuilt = Upstreams::new(&slower, Some((&new, &upstreams)));
        assert!(!same(&rebuilt, "a.test", &upstreams, "a.test"));
    }
}
