//! `kubectl jit console` as a user runs it (alice's kubeconfig), attacked as a hostile web
//! page would (no secret, another Host, a form post), used through its JSON endpoints, and
//! rendered by a real headless Chromium.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

use kube::api::Api;
use portcullis::api::JitRequest;
use portcullis::api::jit_request::Phase;

use crate::support::{Ctx, TestResult, eventually, ssh_policy, succeeded, web_nsg};

pub fn tests() -> Vec<(&'static str, crate::TestFn)> {
    crate::tests![the_console_serves_only_its_user_and_acts_as_them]
}

type Error = Box<dyn std::error::Error + Send + Sync>;
/// An HTTP answer: status, headers (lower-case names), body.
type Reply = (u16, Vec<(String, String)>, String);

/// The console process, killed on drop.
struct Console {
    child: Child,
    address: String,
    token: String,
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Console {
    fn start(ctx: &Ctx, user: &str) -> Result<Self, Error> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kubectl-jit"))
            .arg("--kubeconfig")
            .arg(ctx.plane.kubeconfig(user))
            .args(["-n", &ctx.ns, "console"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().ok_or("no stdout")?).read_line(&mut line)?;
        let url = line
            .trim()
            .rsplit(' ')
            .next()
            .ok_or("no address printed")?
            .to_owned();
        let rest = url.strip_prefix("http://").ok_or("not an http address")?;
        let (address, token) = rest.split_once("/?token=").ok_or("no token printed")?;
        Ok(Self {
            child,
            address: address.to_owned(),
            token: token.to_owned(),
        })
    }

    /// One HTTP/1.1 exchange: the status, the headers (lower-case names) and the body.
    fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<Reply, Error> {
        let mut stream = TcpStream::connect(&self.address)?;
        let mut request = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
        if !headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("host"))
        {
            request += &format!("Host: {}\r\n", self.address);
        }
        for (name, value) in headers {
            request += &format!("{name}: {value}\r\n");
        }
        request += &format!("Content-Length: {}\r\n\r\n{body}", body.len());
        stream.write_all(request.as_bytes())?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let (head, body) = response.split_once("\r\n\r\n").ok_or("no header end")?;
        let mut lines = head.lines();
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or("no status")?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Ok((status, headers, body.to_owned()))
    }

    fn cookie(&self) -> String {
        format!("portcullis_console={}", self.token)
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// A real headless Chromium's view of `url` once its script ran (or why there is none).
fn browser_dom(url: &str) -> Result<String, Error> {
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .ok_or("chromium is missing (apt-get install chromium)")?;
    let profile = tempfile::tempdir()?;
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=8000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--dump-dom", url])
        .output()?;
    if !out.status.success() {
        return Err(format!("chromium: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn the_console_serves_only_its_user_and_acts_as_them(ctx: Ctx) -> TestResult {
    succeeded(&ctx.apply(&web_nsg("198.19.0.0/28", "")))?;
    // Any source: the console asks from this host's own address towards the machine.
    succeeded(&ctx.apply(&ssh_policy("\"*\"", "")))?;
    let console = Console::start(&ctx, "alice")?;
    let page = format!("/?token={}", console.token);

    // A page elsewhere: no secret, or another Host (DNS rebinding), gets nothing.
    assert_eq!(console.call("GET", "/", &[], "")?.0, 401);
    assert_eq!(console.call("GET", "/api/overview", &[], "")?.0, 401);
    assert_eq!(
        console
            .call("GET", &page, &[("Host", "attacker.example:80")], "")?
            .0,
        403
    );
    // The page: the cookie, and a policy that runs only the page's own script.
    let (status, headers, body) = console.call("GET", &page, &[], "")?;
    assert_eq!(status, 200);
    let cookie = header(&headers, "set-cookie").ok_or("no cookie")?;
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let policy = header(&headers, "content-security-policy").ok_or("no CSP")?;
    let nonce = policy
        .split("'nonce-")
        .nth(1)
        .and_then(|n| n.split('\'').next())
        .ok_or("no nonce")?;
    assert!(body.contains(&format!("nonce=\"{nonce}\"")));
    assert!(
        body.contains("<label for=\"duration\">"),
        "the form has labels"
    );
    // A cross-site form can post only form encodings: refused before anything happens.
    let ask = r#"{"policy":"web","machine":"web-1","port":22,"duration":"PT10M","justification":"console"}"#;
    let cookie = console.cookie();
    let (status, _, _) = console.call(
        "POST",
        "/api/requests",
        &[("Cookie", &cookie), ("Content-Type", "text/plain")],
        ask,
    )?;
    assert_eq!(status, 415);
    assert!(
        ctx.api::<JitRequest>()
            .list(&Default::default())
            .await?
            .items
            .is_empty()
    );

    // The page's own calls: a request made as alice, then shown granted.
    let (status, _, created) = console.call(
        "POST",
        "/api/requests",
        &[("Cookie", &cookie), ("Content-Type", "application/json")],
        ask,
    )?;
    assert_eq!(status, 200, "{created}");
    let name = serde_json::from_str::<serde_json::Value>(&created)?["name"]
        .as_str()
        .ok_or("no name")?
        .to_owned();
    let granted = ctx.phase_of(&name, Phase::Granted).await?;
    assert_eq!(
        granted.spec.requestor.map(|r| r.username).as_deref(),
        Some("alice")
    );
    let (status, _, overview) = console.call("GET", "/api/overview", &[("Cookie", &cookie)], "")?;
    assert_eq!(status, 200);
    let overview: serde_json::Value = serde_json::from_str(&overview)?;
    assert_eq!(overview["user"], "alice");
    assert_eq!(
        overview["policies"][0]["machines"][0]["ports"][0]["maxSeconds"],
        3600
    );
    assert_eq!(overview["requests"][0]["phase"], "Granted");

    // A real browser renders it: who is signed in, the machine and port, the countdown.
    let dom = browser_dom(&format!("http://{}{page}", console.address))?;
    for expected in ["Signed in as alice", "web-1 port 22", "left", "Revoke"] {
        if !dom.contains(expected) {
            return Err(format!("the rendered page lacks {expected:?}:\n{dom}").into());
        }
    }

    // Revoke from the page.
    let (status, _, _) = console.call(
        "POST",
        &format!("/api/requests/{name}/revoke"),
        &[("Cookie", &cookie), ("Content-Type", "application/json")],
        "{}",
    )?;
    assert_eq!(status, 204);
    let requests: Api<JitRequest> = ctx.api();
    eventually("the revoked request to go", || async {
        requests.get_opt(&name).await.ok()?.is_none().then_some(())
    })
    .await?;
    Ok(())
}
