//! `kubectl jit console` as a user runs it (alice's kubeconfig), attacked as a hostile web
//! page would (no secret, another Host, a form post), used through its JSON endpoints, and
//! rendered by a real headless Chromium.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

use kube::api::Api;
use portcullis::api::JitRequest;
use portcullis::api::jit_request::Phase;

use crate::support::{
    Ctx, TestResult, approver_binding, eventually, ssh_policy, succeeded, web_nsg,
};

pub fn tests() -> Vec<(&'static str, crate::TestFn)> {
    crate::tests![the_console_serves_only_its_user_and_acts_as_them]
}

type Error = Box<dyn std::error::Error + Send + Sync>;
/// An HTTP answer: status, headers (lower-case names), body.
type Reply = (u16, Vec<(String, String)>, String);

/// The console process, killed on drop.
struct Console {
    child: Child,
    /// Kept open: a console whose stdout is closed dies of SIGPIPE at its next line.
    _stdout: BufReader<std::process::ChildStdout>,
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
        let mut stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        stdout.read_line(&mut line)?;
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
            _stdout: stdout,
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

/// chromedriver on a free local port, killed on drop.
struct Driver(Child, u16);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Driver {
    fn start() -> Result<Self, Error> {
        let driver = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .ok_or("chromedriver is missing (apt-get install chromium chromium-driver)")?;
        let port = portcullis::testenv::free_port()?;
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Self(child, port))
    }

    /// A headless Chromium session, once chromedriver answers.
    async fn session(&self) -> Result<fantoccini::Client, Error> {
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({"args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=900,1250",
            ]}),
        );
        let url = format!("http://127.0.0.1:{}", self.1);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let connected = fantoccini::ClientBuilder::new(
                hyper_util::client::legacy::connect::HttpConnector::new(),
            )
            .capabilities(capabilities.clone())
            .connect(&url)
            .await;
            match connected {
                Ok(client) => return Ok(client),
                Err(error) if std::time::Instant::now() > deadline => {
                    return Err(format!("no chromedriver session: {error}").into());
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            }
        }
    }
}

/// Waits (with a deadline) for an element matching the XPath `path`.
async fn shown(
    browser: &fantoccini::Client,
    path: &str,
) -> Result<fantoccini::elements::Element, Error> {
    Ok(browser
        .wait()
        .at_most(std::time::Duration::from_secs(30))
        .for_element(fantoccini::Locator::XPath(path))
        .await
        .map_err(|e| format!("the page never showed {path}: {e}"))?)
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
    // Alice is no approver (yet): the API's refusal comes back as one, with its reason.
    let (status, _, refused) = console.call(
        "POST",
        &format!("/api/requests/{name}/decide"),
        &[("Cookie", &cookie), ("Content-Type", "application/json")],
        r#"{"decision":"Approve"}"#,
    )?;
    assert_eq!(status, 403, "{refused}");
    assert!(refused.contains("jitapprovals"), "{refused}");
    // Any other refusal keeps its status too: revoking a request that does not exist.
    let (status, _, missing) = console.call(
        "POST",
        "/api/requests/nope/revoke",
        &[("Cookie", &cookie), ("Content-Type", "application/json")],
        "{}",
    )?;
    assert_eq!(status, 404, "{missing}");
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

    // Revoke from the page's own call; then the whole flow by hand in a real browser.
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
    in_a_browser(&ctx, &console).await
}

/// Headless Chromium through WebDriver, as alice: load the page, request a port, see the
/// grant and its countdown, approve bob's request waiting for her, revoke her grant. The
/// page as it looked is kept in `target/console-test.png`.
async fn in_a_browser(ctx: &Ctx, console: &Console) -> Result<(), Error> {
    // Bob waits for an approval alice may give.
    succeeded(
        &ctx.apply(
            &ssh_policy("\"*\"", "")
                .replace("name: web\n", "name: prod\n")
                .replacen(
                    "spec:\n",
                    "spec:\n  approval:\n    approvalsRequired: 1\n",
                    1,
                ),
        ),
    )?;
    succeeded(&ctx.apply(&approver_binding("alice")))?;
    succeeded(
        &ctx.apply_as(
            "bob",
            &["team-web"],
            &crate::enforcement::request("bobs", "198.19.0.10".parse()?, "PT10M")
                .replace("policyName: web", "policyName: prod"),
        ),
    )?;
    ctx.phase_of("bobs", Phase::Pending).await?;

    let driver = Driver::start()?;
    let browser = driver.session().await?;
    let result = async {
        let failed = async |browser: &fantoccini::Client, what: Error| -> Error {
            let said = match browser.find(fantoccini::Locator::Css("main")).await {
                Ok(main) => main.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            format!("{what}\nthe page said:\n{said}").into()
        };
        browser
            .goto(&format!(
                "http://{}/?token={}",
                console.address, console.token
            ))
            .await?;
        shown(
            &browser,
            "//p[@id='who'][contains(., 'Signed in as alice')]",
        )
        .await?;
        // The form: web-1 port 22, ten minutes, a justification, by keyboard-reachable fields.
        let option = shown(
            &browser,
            "//select[@id='target']/option[contains(., '(policy web)')]",
        )
        .await?;
        option.click().await?;
        let duration = browser.find(fantoccini::Locator::Id("duration")).await?;
        duration.clear().await?;
        duration.send_keys("10").await?;
        browser
            .find(fantoccini::Locator::Id("justification"))
            .await?
            .send_keys("from the console")
            .await?;
        browser
            .find(fantoccini::Locator::XPath("//button[@type='submit']"))
            .await?
            .click()
            .await?;
        if let Err(error) = shown(
            &browser,
            "//ul[@id='requests']//span[@class='phase'][. = 'Granted']",
        )
        .await
        {
            return Err(failed(&browser, error).await);
        }
        shown(
            &browser,
            "//ul[@id='requests']//p[@data-expires][contains(., 'left')]",
        )
        .await?;
        // Bob's request, approved from the page.
        shown(
            &browser,
            "//ul[@id='to-approve']//p[contains(., 'bob asks')]",
        )
        .await?;
        let screenshot = browser.screenshot().await?;
        let artifact =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console-test.png");
        std::fs::write(&artifact, screenshot)?;
        shown(&browser, "//button[@aria-label='Approve bobs']")
            .await?
            .click()
            .await?;
        ctx.phase_of("bobs", Phase::Granted).await?;
        // Alice's own grant, revoked from the page.
        let requests: Api<JitRequest> = ctx.api();
        let mine: Vec<String> = requests
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .filter(|r| {
                r.spec
                    .requestor
                    .as_ref()
                    .is_some_and(|w| w.username == "alice")
            })
            .filter_map(|r| r.metadata.name)
            .collect();
        let [mine] = mine.as_slice() else {
            return Err(format!("alice should have one request from the page: {mine:?}").into());
        };
        let granted = requests.get(mine).await?;
        assert_eq!(
            granted.spec.justification.as_deref(),
            Some("from the console")
        );
        assert_eq!(granted.spec.virtual_machines[0].ports[0].duration, "PT10M");
        shown(&browser, &format!("//button[@aria-label='Revoke {mine}']"))
            .await?
            .click()
            .await?;
        eventually("the request revoked from the page to go", || async {
            requests.get_opt(mine).await.ok()?.is_none().then_some(())
        })
        .await?;
        Result::<(), Error>::Ok(())
    }
    .await;
    let _ = browser.close().await;
    result
}
