//! Portcullis: just-in-time network access for machines managed from Kubernetes.
//!
//! The arrows point one way: [`rules`] is the pure NSG model (no Kubernetes in it), [`api`]
//! holds the custom resources and their conversion into that model, and the kube-facing
//! pieces (controllers, agent) build on both.

pub mod access;
pub mod agent;
pub mod api;
pub mod cli;
pub mod console;
pub mod controller;
pub mod dev;
pub mod fnv;
pub mod plugin;
pub mod rules;
pub mod testenv;
