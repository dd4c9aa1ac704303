//! Synthetic customer-event traffic in the Segment Spec shape (SPEC §2), for benchmarks, `replay`
//! fixtures and the live demo.
//!
//! [`Generator`] is an iterator of NDJSON lines (one JSON object each, no trailing newline). It
//! yields exactly [`GeneratorConfig::events`] lines, and the same config gives byte-identical
//! output on every platform: the PRNG is xoshiro256** seeded through splitmix64, and the only
//! transcendental functions used (`ln`, `exp`) are computed here from IEEE basic operations
//! instead of the platform's libm.
//!
//! # What the stream looks like
//!
//! * **Customers** are `c-0` … `c-{customers-1}`. Who starts a session follows a Zipf–Mandelbrot
//!   law (exponent 1, offset 10) over a seeded permutation of the ids, mixed with 10 % uniform
//!   picks: a few heavy customers, a long tail. A customer rarely runs two sessions at once, which
//!   caps the heavy ones over short spans. With the defaults (1 000 000 events at 50/s, 5.5 h)
//!   about 47 000 of the 100 000 customers appear, the top 1 % produce about 22 % of the
//!   customer events and the top 10 % about 59 %; the median customer seen has 12 events.
//! * **Sessions** (about 6 % anonymous visitors with only `anonymousId`; the rest `userId`, a
//!   third of the browser ones with an `anonymousId` as well; 25 % mobile `screen`, otherwise
//!   `page`): a landing page, 1–12 (mean ≈ 3) `Product Viewed` (`product_id`, `category` among 10,
//!   `price`) from a 2 000-product catalogue with skewed popularity, each often preceded by a
//!   product page view; `Product Added` (`cart_id`, `product_id`, `price`, `quantity`) on 15 % of
//!   views; a cart proceeds to `Checkout Started` 55 % of the time and then to `Order Completed`
//!   (`order_id`, `revenue` = sum of the cart, `currency` USD for US customers, else EUR) 72 % of
//!   the time, so most carts are abandoned. Events of a session are at least 2 s apart (mean
//!   ≈ 27 s).
//! * **Identify**: a customer's first session starts with an `identify` carrying `email`,
//!   `country` (NL, DE, BE, FR, GB, US, ES, IT, SE, PL), `plan` (free/pro/enterprise), `age` and
//!   `email_opt_in`; 4 % of later sessions repeat it, most of those with one trait changed.
//! * **Email campaigns** (`campaign_id`, `campaign_name`, `channel` server, timestamps mostly epoch
//!   milliseconds) go to 15–35 % (at most 5 000) of the opted-in customers seen so far, about
//!   every 50 000 lines: `Email Delivered` in a burst 5 ms apart, `Email Opened` for 35 % (mean
//!   45 min later), `Email Link Clicked` (`link_url`) for a quarter of those, and most clicks lead
//!   to a session landing on the campaign's category page.
//! * Mix with the defaults: `Product Viewed` 37 %, `page` 27 %, `screen` 8 %, `Email Delivered`
//!   9 %, `Product Added` 5.6 %, `identify` 5 %, `Email Opened` 3 %, `Checkout Started` 2.3 %,
//!   `Order Completed` 1.6 %, `Email Link Clicked` 0.75 %. Lines average about 215 bytes (95 %
//!   within 165–255).
//!
//! # Time
//!
//! The logical stream time starts at `start_ms` and advances by an exponentially distributed gap
//! with mean `1 / events_per_second` seconds per line. Every on-time event carries the stream time
//! of its line, so on-time timestamps never decrease. Timestamps are RFC 3339 UTC with
//! milliseconds (`2026-11-01T10:00:00.123Z`), sometimes epoch milliseconds as a JSON number and
//! occasionally RFC 3339 with a non-zero offset (the same instant). Sessions and campaigns are
//! scheduled ahead in a queue; a new session starts whenever nothing scheduled is due, so the
//! number of concurrent sessions adapts to the rate.
//!
//! # Faults
//!
//! Each line independently is, with the configured probabilities (fractions of all lines):
//! a verbatim copy of one of the last 1 024 good lines (`duplicate_fraction`, same `messageId`),
//! malformed (`malformed_fraction`: not JSON, a JSON array, no `userId`/`anonymousId`, an
//! unparsable timestamp string, or `type` `"alias"`), or late (`late_fraction`: a fresh event whose
//! timestamp is 1 s – 10 min older than the stream time). [`Generator::next_line`] reports which.
//! Every other line is a fresh event with a unique `messageId` `m-<n>`.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::fmt::{self, Write as _};
use std::io;

/// 2026-11-01T00:00:00.000Z as epoch milliseconds, the default start of the stream.
pub const DEFAULT_START_MS: i64 = 1_793_491_200_000;

const MS_PER_DAY: i64 = 86_400_000;
const DEFAULT_RATE: f64 = 50.0;
const SHOP: &str = "https://shop.example.com";

/// Duplicates copy one of this many most recent good lines.
const RECENT_LINES: usize = 1_024;
/// Above this many scheduled events the earliest one is emitted even if it is not due yet, which
/// bounds memory at very high rates.
const MAX_PENDING: usize = 200_000;

const ZIPF_OFFSET: f64 = 10.0;
const UNIFORM_SHARE: f64 = 0.10;
const ANONYMOUS_SESSION_SHARE: f64 = 0.06;
const MOBILE_SHARE: f64 = 0.25;
const DEVICE_ID_SHARE: f64 = 0.3;
const REPEAT_IDENTIFY: f64 = 0.04;
const IDENTIFY_CHANGES: f64 = 0.6;

const CATALOG: u64 = 2_000;
const PRODUCT_ZIPF_OFFSET: f64 = 20.0;
const MORE_VIEWS: f64 = 0.65;
const MAX_VIEWS: u32 = 12;
const PRODUCT_PAGE: f64 = 0.5;
const ADD_TO_CART: f64 = 0.15;
const CHECKOUT: f64 = 0.55;
const ORDER: f64 = 0.72;
const THINK_MIN_MS: i64 = 2_000;
const THINK_MEAN_MS: f64 = 25_000.0;

const FIRST_CAMPAIGN_LINE: u64 = 5_000;
const CAMPAIGN_EVERY_LINES: f64 = 50_000.0;
const MIN_CAMPAIGN_GAP_LINES: u64 = 1_000;
const MAX_RECIPIENTS: u64 = 5_000;
const DELIVERY_SPACING_MS: i64 = 5;
const OPEN_RATE: f64 = 0.35;
const OPEN_MIN_MS: i64 = 30_000;
const OPEN_MEAN_MS: f64 = 45.0 * 60_000.0;
const CLICK_RATE: f64 = 0.25;
const CLICK_MIN_MS: i64 = 3_000;
const CLICK_MEAN_MS: f64 = 60_000.0;
const CLICK_SESSION: f64 = 0.6;

const LATE_MIN_MS: u64 = 1_000;
const LATE_MAX_MS: u64 = 600_000;

const COUNTRIES: [&str; 10] = ["NL", "DE", "BE", "FR", "GB", "US", "ES", "IT", "SE", "PL"];
const COUNTRY_WEIGHTS: [u32; 10] = [26, 18, 11, 12, 10, 12, 4, 3, 2, 2];
const PLANS: [&str; 3] = ["free", "pro", "enterprise"];
const PLAN_WEIGHTS: [u32; 3] = [70, 25, 5];
/// Category, cheapest and dearest price in whole currency units.
const CATEGORIES: [(&str, u64, u64); 10] = [
    ("electronics", 15, 1_200),
    ("books", 5, 40),
    ("clothing", 10, 120),
    ("shoes", 30, 200),
    ("home", 10, 300),
    ("garden", 5, 250),
    ("toys", 8, 80),
    ("sports", 15, 400),
    ("beauty", 3, 60),
    ("grocery", 1, 30),
];
const CAMPAIGN_NAMES: [&str; 8] = [
    "Weekly picks",
    "Black Friday preview",
    "Back in stock",
    "Winter sale",
    "New arrivals",
    "Members only",
    "Last chance",
    "Gift guide",
];
/// Offsets (minutes) for the few RFC 3339 timestamps not written in UTC.
const OFFSETS: [i32; 5] = [60, 120, -300, 330, -480];
const BAD_TIMESTAMPS: [&str; 6] = [
    "yesterday",
    "",
    "2026-11-01T25:00:00Z",
    "2026-13-01T10:00:00Z",
    "11/01/2026 10:00:00",
    "not-a-timestamp",
];

/// What to generate. Out-of-range values are clamped by [`Generator::new`] (see
/// [`Generator::config`]): 0 customers counts as 1, a rate that is not a positive number becomes
/// 50/s, fractions are clamped to `[0, 1]` (NaN → 0).
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratorConfig {
    /// Size of the customer base; ids are `c-0` … `c-{customers-1}`.
    pub customers: u64,
    /// Number of lines to yield.
    pub events: u64,
    /// Same seed (and config) ⇒ same lines.
    pub seed: u64,
    /// Event time of the first line, epoch milliseconds.
    pub start_ms: i64,
    /// Logical event-time rate: the stream time advances by 1/rate s per line on average.
    pub events_per_second: f64,
    /// Fraction of lines that are fresh events with a timestamp 1 s – 10 min in the past.
    pub late_fraction: f64,
    /// Fraction of lines that repeat a recent good line verbatim.
    pub duplicate_fraction: f64,
    /// Fraction of lines that are unusable input.
    pub malformed_fraction: f64,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self {
            customers: 100_000,
            events: 1_000_000,
            seed: 42,
            start_ms: DEFAULT_START_MS,
            events_per_second: DEFAULT_RATE,
            late_fraction: 0.01,
            duplicate_fraction: 0.005,
            malformed_fraction: 0.0,
        }
    }
}

/// How a line was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LineKind {
    /// A fresh event stamped with the current stream time.
    Event,
    /// A fresh event stamped 1 s – 10 min before the current stream time.
    Late,
    /// A verbatim copy of an earlier `Event` or `Late` line.
    Duplicate,
    /// Unusable input; a consumer should dead-letter it.
    Malformed(Malformation),
}

/// The ways a malformed line is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Malformation {
    /// Truncated JSON or a form-encoded body.
    NotJson,
    /// A valid event wrapped in a JSON array.
    JsonArray,
    /// Neither `userId` nor `anonymousId`.
    MissingCustomerId,
    /// `timestamp` is a string that is not RFC 3339.
    BadTimestamp,
    /// `"type":"alias"`.
    UnknownType,
}

/// One generated line with what it is, for tests and benchmarks that need the expected outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedLine {
    /// The JSON text, without a newline.
    pub line: String,
    pub kind: LineKind,
    /// The logical stream time when the line was emitted (epoch ms); an `Event` carries exactly
    /// this timestamp.
    pub stream_time_ms: i64,
}

/// Counts of the lines generated so far, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GeneratorStats {
    pub lines: u64,
    pub on_time: u64,
    pub late: u64,
    pub duplicates: u64,
    pub malformed: u64,
}

/// The event generator; see the module documentation.
#[derive(Debug)]
pub struct Generator {
    config: GeneratorConfig,
    rng: Rng,
    mean_gap_ms: f64,
    /// Stream time minus `start_ms`, fractional.
    elapsed_ms: f64,
    customer_mult: u64,
    customer_offset: u64,
    customers: HashMap<u64, Customer>,
    /// Customers in order of first appearance (the mailing list).
    seen: Vec<u64>,
    pending: BinaryHeap<Scheduled>,
    recent: Vec<String>,
    recent_next: usize,
    next_seq: u64,
    next_message: u64,
    next_cart: u64,
    next_order: u64,
    next_campaign: u64,
    next_campaign_line: u64,
    stats: GeneratorStats,
}

impl Generator {
    pub fn new(config: GeneratorConfig) -> Self {
        let config = sanitize(config);
        let mut rng = Rng::new(config.seed);
        let customer_mult = coprime_below(&mut rng, config.customers);
        let customer_offset = rng.below(config.customers);
        let next_campaign_line = FIRST_CAMPAIGN_LINE.min(config.events / 10);
        Self {
            mean_gap_ms: 1_000.0 / config.events_per_second,
            config,
            rng,
            elapsed_ms: 0.0,
            customer_mult,
            customer_offset,
            customers: HashMap::new(),
            seen: Vec::new(),
            pending: BinaryHeap::new(),
            recent: Vec::new(),
            recent_next: 0,
            next_seq: 0,
            next_message: 0,
            next_cart: 0,
            next_order: 0,
            next_campaign: 0,
            next_campaign_line,
            stats: GeneratorStats::default(),
        }
    }

    /// The id of the customer with this index: `c-<index>`.
    pub fn customer_id(index: u64) -> String {
        format!("c-{index}")
    }

    /// The effective (sanitized) configuration.
    pub fn config(&self) -> &GeneratorConfig {
        &self.config
    }

    /// Counts of the lines generated so far.
    pub fn stats(&self) -> GeneratorStats {
        self.stats
    }

    /// The stream time the next line will be emitted at (epoch ms).
    pub fn stream_time_ms(&self) -> i64 {
        // `as` saturates (and maps NaN to 0), so an absurd rate cannot overflow.
        self.config.start_ms.saturating_add(self.elapsed_ms as i64)
    }

    /// The next line together with its kind, or `None` after `events` lines.
    pub fn next_line(&mut self) -> Option<GeneratedLine> {
        if self.stats.lines >= self.config.events {
            return None;
        }
        let now = self.stream_time_ms();
        let duplicate = self.config.duplicate_fraction;
        let malformed = duplicate + self.config.malformed_fraction;
        let late = malformed + self.config.late_fraction;
        let r = self.rng.unit();
        let copy = if r < duplicate {
            self.pick_recent()
        } else {
            None
        };
        let (line, kind) = if let Some(line) = copy {
            self.stats.duplicates += 1;
            (line, LineKind::Duplicate)
        } else if (duplicate..malformed).contains(&r) {
            self.stats.malformed += 1;
            let (line, how) = self.malformed_line(now);
            (line, LineKind::Malformed(how))
        } else if (malformed..late).contains(&r) {
            self.stats.late += 1;
            let back = self.rng.range(LATE_MIN_MS, LATE_MAX_MS) as i64;
            (
                self.fresh_event(now, now.saturating_sub(back)),
                LineKind::Late,
            )
        } else {
            self.stats.on_time += 1;
            (self.fresh_event(now, now), LineKind::Event)
        };
        self.stats.lines += 1;
        self.elapsed_ms += self.rng.exp(self.mean_gap_ms);
        Some(GeneratedLine {
            line,
            kind,
            stream_time_ms: now,
        })
    }

    fn pick_recent(&mut self) -> Option<String> {
        if self.recent.is_empty() {
            return None;
        }
        let i = self.rng.below(self.recent.len() as u64) as usize;
        self.recent.get(i).cloned()
    }

    fn remember(&mut self, line: &str) {
        if self.recent.len() < RECENT_LINES {
            self.recent.push(line.to_owned());
        } else if let Some(slot) = self.recent.get_mut(self.recent_next) {
            slot.clear();
            slot.push_str(line);
        }
        self.recent_next = (self.recent_next + 1) % RECENT_LINES;
    }

    fn take_message_id(&mut self) -> u64 {
        self.next_message += 1;
        self.next_message
    }

    /// The next scheduled event, rendered with timestamp `at`.
    fn fresh_event(&mut self, now: i64, at: i64) -> String {
        let event = self.next_pending(now);
        let stamp = self.stamp(event.channel, at);
        let id = self.take_message_id();
        let line = render(&event, id, stamp);
        self.remember(&line);
        line
    }

    fn next_pending(&mut self, now: i64) -> Pending {
        if self.stats.lines >= self.next_campaign_line {
            self.launch_campaign(now);
        }
        let take = self
            .pending
            .peek()
            .is_some_and(|top| top.due <= now || self.pending.len() >= MAX_PENDING);
        if !take {
            // Everything scheduled lies in the future: somebody new shows up. The session's first
            // event is due now, before everything else queued.
            self.start_session(now);
        }
        match self.pending.pop() {
            Some(scheduled) => scheduled.event,
            // Unreachable: a new session always schedules at least one event.
            None => Pending {
                who: Who::Anonymous(self.rng.next_u64()),
                kind: Kind::Page("Home"),
                channel: Channel::Browser,
                fields: page_properties("Home", &format!("{SHOP}/")),
            },
        }
    }

    fn stamp(&mut self, channel: Channel, at: i64) -> Stamp {
        let r = self.rng.unit();
        match channel {
            Channel::Server if r < 0.6 => Stamp::EpochMs(at),
            Channel::Server => Stamp::Rfc3339(at),
            _ if r < 0.03 => Stamp::EpochMs(at),
            _ if r < 0.05 => Stamp::Offset(at, self.rng.pick(&OFFSETS)),
            _ => Stamp::Rfc3339(at),
        }
    }

    fn schedule_one(&mut self, due: i64, event: Pending) {
        self.next_seq += 1;
        self.pending.push(Scheduled {
            due,
            seq: self.next_seq,
            event,
        });
    }

    fn schedule(&mut self, script: Script) {
        for (due, event) in script.items {
            self.schedule_one(due, event);
        }
    }

    fn permute(&self, rank: u64) -> u64 {
        let n = u128::from(self.config.customers);
        let x =
            u128::from(rank) * u128::from(self.customer_mult) + u128::from(self.customer_offset);
        // The remainder is below `customers`, so it fits.
        (x % n) as u64
    }

    fn pick_customer(&mut self, now: i64) -> u64 {
        let n = self.config.customers;
        let mut index = 0;
        // Avoid overlapping sessions of one customer, without insisting.
        for _ in 0..4 {
            let rank = if self.rng.chance(UNIFORM_SHARE) {
                self.rng.below(n)
            } else {
                skewed_rank(&mut self.rng, n, ZIPF_OFFSET)
            };
            index = self.permute(rank);
            if self
                .customers
                .get(&index)
                .is_none_or(|c| c.busy_until <= now)
            {
                break;
            }
        }
        index
    }

    fn start_session(&mut self, now: i64) {
        if self.rng.chance(ANONYMOUS_SESSION_SHARE) {
            let visitor = self.rng.next_u64();
            let mut script = Script::new(Who::Anonymous(visitor), Channel::Browser, now);
            self.browse(&mut script, None, "EUR");
            self.schedule(script);
            return;
        }
        let index = self.pick_customer(now);
        let channel = if self.rng.chance(MOBILE_SHARE) {
            Channel::Mobile
        } else {
            Channel::Browser
        };
        let device = if channel == Channel::Browser && self.rng.chance(DEVICE_ID_SHARE) {
            Some(device_id(self.config.seed, index))
        } else {
            None
        };
        let mut script = Script::new(Who::User { index, device }, channel, now);
        let customer = match self.customers.get_mut(&index) {
            None => {
                let customer = Customer::new(&mut self.rng);
                self.customers.insert(index, customer);
                self.seen.push(index);
                Some(customer)
            }
            Some(customer) if self.rng.chance(REPEAT_IDENTIFY) => {
                if self.rng.chance(IDENTIFY_CHANGES) {
                    customer.change_a_trait(&mut self.rng);
                }
                Some(*customer)
            }
            Some(_) => None,
        };
        if let Some(customer) = customer {
            script.push(Kind::Identify, customer.traits(index));
            script.think(&mut self.rng);
        }
        let currency = self.currency(index);
        self.browse(&mut script, None, currency);
        self.finish_user_session(index, script);
    }

    fn currency(&self, index: u64) -> &'static str {
        match self.customers.get(&index) {
            Some(c) if COUNTRIES.get(usize::from(c.country)) == Some(&"US") => "USD",
            _ => "EUR",
        }
    }

    fn finish_user_session(&mut self, index: u64, script: Script) {
        if let Some(customer) = self.customers.get_mut(&index) {
            customer.busy_until = customer.busy_until.max(script.t);
        }
        self.schedule(script);
    }

    /// A browsing session: landing page, product views, maybe a cart, a checkout and an order.
    /// The first event is at `script.t`.
    fn browse(&mut self, script: &mut Script, from: Option<&Campaign>, currency: &'static str) {
        let (name, url) = match from {
            Some(c) => (
                "Category",
                format!(
                    "{SHOP}/c/{}?utm_source=email&utm_campaign=cmp-{}",
                    c.category, c.id
                ),
            ),
            None => match self.rng.weighted(&[55, 25, 10, 10]) {
                0 => ("Home", format!("{SHOP}/")),
                1 => ("Category", format!("{SHOP}/c/{}", self.random_category())),
                2 => (
                    "Search",
                    format!("{SHOP}/search?q={}", self.random_category()),
                ),
                _ => ("Deals", format!("{SHOP}/deals")),
            },
        };
        script.page(name, &url);
        script.think(&mut self.rng);

        let mut views = 1;
        while views < MAX_VIEWS && self.rng.chance(MORE_VIEWS) {
            views += 1;
        }
        let can_buy = matches!(script.who, Who::User { .. });
        let mut cart: Option<Cart> = None;
        for _ in 0..views {
            let product =
                Product::from_rank(skewed_rank(&mut self.rng, CATALOG, PRODUCT_ZIPF_OFFSET));
            if self.rng.chance(PRODUCT_PAGE) {
                script.page("Product", &format!("{SHOP}/p/p-{}", product.id));
                script.think(&mut self.rng);
            }
            script.push(
                Kind::Track("Product Viewed"),
                format!(
                    "\"properties\":{{\"product_id\":\"p-{}\",\"category\":\"{}\",\"price\":{}}}",
                    product.id,
                    product.category,
                    Money(product.price_cents)
                ),
            );
            script.think(&mut self.rng);
            // Anonymous visitors add to cart too, but never check out.
            if self.rng.chance(ADD_TO_CART) {
                let quantity = match self.rng.weighted(&[85, 12, 3]) {
                    0 => 1,
                    1 => 2,
                    _ => 3,
                };
                let cart = cart.get_or_insert_with(|| {
                    self.next_cart += 1;
                    Cart {
                        id: self.next_cart,
                        cents: 0,
                        items: 0,
                    }
                });
                cart.cents += product.price_cents * quantity;
                cart.items += quantity;
                script.push(
                    Kind::Track("Product Added"),
                    format!(
                        "\"properties\":{{\"cart_id\":\"cart-{}\",\"product_id\":\"p-{}\",\
                         \"category\":\"{}\",\"price\":{},\"quantity\":{quantity}}}",
                        cart.id,
                        product.id,
                        product.category,
                        Money(product.price_cents)
                    ),
                );
                script.think(&mut self.rng);
            }
        }
        let Some(cart) = cart else { return };
        if !can_buy || !self.rng.chance(CHECKOUT) {
            return; // abandoned
        }
        script.page("Checkout", &format!("{SHOP}/checkout"));
        script.think(&mut self.rng);
        script.push(
            Kind::Track("Checkout Started"),
            format!(
                "\"properties\":{{\"cart_id\":\"cart-{}\",\"value\":{},\"currency\":\"{currency}\",\
                 \"products\":{}}}",
                cart.id,
                Money(cart.cents),
                cart.items
            ),
        );
        script.think(&mut self.rng);
        if !self.rng.chance(ORDER) {
            return; // abandoned at checkout
        }
        self.next_order += 1;
        script.push(
            Kind::Track("Order Completed"),
            format!(
                "\"properties\":{{\"order_id\":\"o-{}\",\"cart_id\":\"cart-{}\",\"revenue\":{},\
                 \"currency\":\"{currency}\",\"products\":{}}}",
                self.next_order,
                cart.id,
                Money(cart.cents),
                cart.items
            ),
        );
        script.think(&mut self.rng);
        script.page("Order Confirmation", &format!("{SHOP}/checkout/complete"));
        script.think(&mut self.rng);
    }

    fn random_category(&mut self) -> &'static str {
        self.rng.pick(&CATEGORIES).0
    }

    /// Mails a share of the opted-in customers seen so far, in a burst starting now.
    fn launch_campaign(&mut self, now: i64) {
        let gap = self.rng.exp(CAMPAIGN_EVERY_LINES) as u64;
        self.next_campaign_line = self
            .stats
            .lines
            .saturating_add(gap.max(MIN_CAMPAIGN_GAP_LINES));
        let audience = self.seen.len() as u64;
        if audience == 0 {
            return;
        }
        let share = 0.15 + 0.2 * self.rng.unit();
        let target = ((audience as f64 * share).ceil() as u64).clamp(1, MAX_RECIPIENTS);
        self.next_campaign += 1;
        let campaign = Campaign {
            id: self.next_campaign,
            name: self.rng.pick(&CAMPAIGN_NAMES),
            category: self.random_category(),
        };
        // Walk the mailing list in a seeded order (a stride coprime to its length).
        let step = coprime_below(&mut self.rng, audience);
        let mut pos = self.rng.below(audience);
        let mut at = now;
        let mut sent = 0;
        for _ in 0..audience {
            if sent >= target {
                break;
            }
            let index = self.seen.get(pos as usize).copied();
            pos = (pos + step) % audience;
            let Some(index) = index else { continue };
            if self.customers.get(&index).is_some_and(|c| c.email_opt_in) {
                sent += 1;
                self.email(&campaign, index, at);
                at = at.saturating_add(DELIVERY_SPACING_MS);
            }
        }
    }

    fn email(&mut self, campaign: &Campaign, index: u64, delivered: i64) {
        let who = Who::User {
            index,
            device: None,
        };
        let props = format!(
            "\"properties\":{{\"campaign_id\":\"cmp-{}\",\"campaign_name\":\"{}\"",
            campaign.id, campaign.name
        );
        let event = |name: &'static str, fields: String| Pending {
            who,
            kind: Kind::Track(name),
            channel: Channel::Server,
            fields,
        };
        self.schedule_one(delivered, event("Email Delivered", format!("{props}}}")));
        if !self.rng.chance(OPEN_RATE) {
            return;
        }
        let opened = delivered
            .saturating_add(OPEN_MIN_MS)
            .saturating_add(self.rng.exp(OPEN_MEAN_MS) as i64);
        self.schedule_one(opened, event("Email Opened", format!("{props}}}")));
        if !self.rng.chance(CLICK_RATE) {
            return;
        }
        let clicked = opened
            .saturating_add(CLICK_MIN_MS)
            .saturating_add(self.rng.exp(CLICK_MEAN_MS) as i64);
        let link = format!(
            "{SHOP}/c/{}?utm_source=email&utm_campaign=cmp-{}",
            campaign.category, campaign.id
        );
        self.schedule_one(
            clicked,
            event(
                "Email Link Clicked",
                format!("{props},\"link_url\":\"{link}\"}}"),
            ),
        );
        if !self.rng.chance(CLICK_SESSION) {
            return;
        }
        let channel = if self.rng.chance(MOBILE_SHARE) {
            Channel::Mobile
        } else {
            Channel::Browser
        };
        let start = clicked
            .saturating_add(1_000)
            .saturating_add(self.rng.exp(4_000.0) as i64);
        let mut script = Script::new(who, channel, start);
        let currency = self.currency(index);
        self.browse(&mut script, Some(campaign), currency);
        self.finish_user_session(index, script);
    }

    fn malformed_line(&mut self, now: i64) -> (String, Malformation) {
        let how = match self.rng.below(5) {
            0 => Malformation::NotJson,
            1 => Malformation::JsonArray,
            2 => Malformation::MissingCustomerId,
            3 => Malformation::BadTimestamp,
            _ => Malformation::UnknownType,
        };
        let rank = skewed_rank(&mut self.rng, self.config.customers, ZIPF_OFFSET);
        let index = self.permute(rank);
        let product = Product::from_rank(skewed_rank(&mut self.rng, CATALOG, PRODUCT_ZIPF_OFFSET));
        let mut event = Pending {
            who: Who::User {
                index,
                device: None,
            },
            kind: Kind::Track("Product Viewed"),
            channel: Channel::Browser,
            fields: format!(
                "\"properties\":{{\"product_id\":\"p-{}\",\"category\":\"{}\",\"price\":{}}}",
                product.id,
                product.category,
                Money(product.price_cents)
            ),
        };
        let id = self.take_message_id();
        let mut stamp = Stamp::Rfc3339(now);
        let line = match how {
            Malformation::NotJson if self.rng.chance(0.5) => {
                format!("type=track&event=Product%20Viewed&userId=c-{index}&messageId=m-{id}")
            }
            Malformation::NotJson => {
                let mut line = render(&event, id, stamp);
                let mut cut = line.len() / 2;
                while !line.is_char_boundary(cut) {
                    cut -= 1;
                }
                line.truncate(cut);
                line
            }
            Malformation::JsonArray => format!("[{}]", render(&event, id, stamp)),
            Malformation::MissingCustomerId => {
                event.who = Who::Nobody;
                render(&event, id, stamp)
            }
            Malformation::BadTimestamp => {
                stamp = Stamp::Invalid(self.rng.pick(&BAD_TIMESTAMPS));
                render(&event, id, stamp)
            }
            Malformation::UnknownType => {
                event.kind = Kind::Alias;
                event.fields = format!(
                    "\"previousId\":\"a-{:016x}\"",
                    device_id(self.config.seed, index)
                );
                render(&event, id, stamp)
            }
        };
        (line, how)
    }
}

impl Iterator for Generator {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        self.next_line().map(|generated| generated.line)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let remaining = self.config.events.saturating_sub(self.stats.lines);
        match usize::try_from(remaining) {
            Ok(n) => (n, Some(n)),
            Err(_) => (usize::MAX, None),
        }
    }
}

/// Writes all of the generator's lines to `out`, each followed by `\n`; returns the line count.
pub fn write_ndjson<W: io::Write>(generator: Generator, out: &mut W) -> io::Result<u64> {
    let mut lines = 0;
    for line in generator {
        out.write_all(line.as_bytes())?;
        out.write_all(b"\n")?;
        lines += 1;
    }
    Ok(lines)
}

/// The approximate stream time after the last line, `start_ms + events / rate` (epoch ms): a
/// good `replay --until` for generated input.
pub fn approx_end_ms(config: &GeneratorConfig) -> i64 {
    let config = sanitize(config.clone());
    let span = config.events as f64 * 1_000.0 / config.events_per_second;
    config.start_ms.saturating_add(span as i64)
}

/// Formats epoch milliseconds as RFC 3339 UTC with milliseconds, e.g.
/// `2026-11-01T10:00:00.123Z`. Years outside 0000–9999 are written as plain (signed) integers.
pub fn format_rfc3339_ms(ms: i64) -> String {
    let mut out = String::with_capacity(24);
    push_datetime(&mut out, ms);
    out.push('Z');
    out
}

/// `(year, month, day)` of a day count since 1970-01-01 (proleptic Gregorian; H. Hinnant's
/// `civil_from_days`).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March-based
    let day = doy - (153 * mp + 2) / 5 + 1; // [1, 31]
    let month = if mp < 10 { mp + 3 } else { mp - 9 }; // [1, 12]
    let year = yoe + era * 400 + i64::from(month <= 2);
    // Both are small and positive, see the ranges above.
    (year, month as u32, day as u32)
}

fn push_datetime(out: &mut String, ms: i64) {
    let (year, month, day) = civil_from_days(ms.div_euclid(MS_PER_DAY));
    let of_day = ms.rem_euclid(MS_PER_DAY);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}",
        of_day / 3_600_000,
        of_day / 60_000 % 60,
        of_day / 1_000 % 60,
        of_day % 1_000
    );
}

fn sanitize(mut config: GeneratorConfig) -> GeneratorConfig {
    fn fraction(f: f64) -> f64 {
        if f.is_nan() {
            0.0
        } else {
            f.clamp(0.0, 1.0)
        }
    }
    config.customers = config.customers.max(1);
    if !(config.events_per_second.is_finite() && config.events_per_second > 0.0) {
        config.events_per_second = DEFAULT_RATE;
    }
    config.late_fraction = fraction(config.late_fraction);
    config.duplicate_fraction = fraction(config.duplicate_fraction);
    config.malformed_fraction = fraction(config.malformed_fraction);
    config
}

// ---------------------------------------------------------------------------------------------
// Events and rendering
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    User { index: u64, device: Option<u64> },
    Anonymous(u64),
    Nobody,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Track(&'static str),
    Page(&'static str),
    Screen(&'static str),
    Identify,
    /// Only in malformed lines.
    Alias,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Channel {
    Browser,
    Mobile,
    Server,
}

impl Channel {
    fn name(self) -> &'static str {
        match self {
            Channel::Browser => "browser",
            Channel::Mobile => "mobile",
            Channel::Server => "server",
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Stamp {
    Rfc3339(i64),
    EpochMs(i64),
    /// The instant, written in local time at this many minutes east of UTC.
    Offset(i64, i32),
    Invalid(&'static str),
}

/// An event waiting for its line; `fields` is the rendered tail of the object (`"properties":…`
/// or `"traits":…`), without the leading comma.
#[derive(Debug, Clone)]
struct Pending {
    who: Who,
    kind: Kind,
    channel: Channel,
    fields: String,
}

#[derive(Debug)]
struct Scheduled {
    due: i64,
    seq: u64,
    event: Pending,
}

// `BinaryHeap` is a max-heap: order so that the earliest (due, seq) is the greatest.
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .due
            .cmp(&self.due)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        self.due == other.due && self.seq == other.seq
    }
}

impl Eq for Scheduled {}

/// All generated strings (ids, names, URLs, constants) are plain ASCII without `"` or `\`, so
/// they are written into the JSON text without escaping.
fn render(event: &Pending, message_id: u64, stamp: Stamp) -> String {
    let mut out = String::with_capacity(256);
    let kind = match event.kind {
        Kind::Track(_) => "track",
        Kind::Page(_) => "page",
        Kind::Screen(_) => "screen",
        Kind::Identify => "identify",
        Kind::Alias => "alias",
    };
    let _ = write!(out, "{{\"type\":\"{kind}\"");
    if let Kind::Track(name) = event.kind {
        let _ = write!(out, ",\"event\":\"{name}\"");
    }
    match event.who {
        Who::User { index, device } => {
            let _ = write!(out, ",\"userId\":\"c-{index}\"");
            if let Some(device) = device {
                let _ = write!(out, ",\"anonymousId\":\"a-{device:016x}\"");
            }
        }
        Who::Anonymous(visitor) => {
            let _ = write!(out, ",\"anonymousId\":\"a-{visitor:016x}\"");
        }
        Who::Nobody => {}
    }
    let _ = write!(out, ",\"messageId\":\"m-{message_id}\",\"timestamp\":");
    match stamp {
        Stamp::Rfc3339(ms) => {
            out.push('"');
            push_datetime(&mut out, ms);
            out.push_str("Z\"");
        }
        Stamp::EpochMs(ms) => {
            let _ = write!(out, "{ms}");
        }
        Stamp::Offset(ms, minutes) => {
            out.push('"');
            push_datetime(&mut out, ms.saturating_add(i64::from(minutes) * 60_000));
            let sign = if minutes < 0 { '-' } else { '+' };
            let abs = minutes.unsigned_abs();
            let _ = write!(out, "{sign}{:02}:{:02}\"", abs / 60, abs % 60);
        }
        Stamp::Invalid(text) => {
            let _ = write!(out, "\"{text}\"");
        }
    }
    let _ = write!(out, ",\"channel\":\"{}\"", event.channel.name());
    if let Kind::Page(name) | Kind::Screen(name) = event.kind {
        let _ = write!(out, ",\"name\":\"{name}\"");
    }
    if !event.fields.is_empty() {
        out.push(',');
        out.push_str(&event.fields);
    }
    out.push('}');
    out
}

fn page_properties(name: &str, url: &str) -> String {
    format!("\"properties\":{{\"name\":\"{name}\",\"url\":\"{url}\"}}")
}

/// A session's events, each at the script's clock when pushed.
struct Script {
    who: Who,
    channel: Channel,
    t: i64,
    items: Vec<(i64, Pending)>,
}

impl Script {
    fn new(who: Who, channel: Channel, start: i64) -> Self {
        Self {
            who,
            channel,
            t: start,
            items: Vec::with_capacity(16),
        }
    }

    fn push(&mut self, kind: Kind, fields: String) {
        self.items.push((
            self.t,
            Pending {
                who: self.who,
                kind,
                channel: self.channel,
                fields,
            },
        ));
    }

    /// A `page` view in the browser, a `screen` view in the app.
    fn page(&mut self, name: &'static str, url: &str) {
        if self.channel == Channel::Mobile {
            self.push(
                Kind::Screen(name),
                format!("\"properties\":{{\"name\":\"{name}\"}}"),
            );
        } else {
            self.push(Kind::Page(name), page_properties(name, url));
        }
    }

    fn think(&mut self, rng: &mut Rng) {
        let pause = THINK_MIN_MS.saturating_add(rng.exp(THINK_MEAN_MS) as i64);
        self.t = self.t.saturating_add(pause);
    }
}

#[derive(Debug, Clone, Copy)]
struct Customer {
    country: u8,
    plan: u8,
    age: u8,
    email_opt_in: bool,
    /// End of the customer's latest scheduled session.
    busy_until: i64,
}

impl Customer {
    fn new(rng: &mut Rng) -> Self {
        Self {
            country: rng.weighted(&COUNTRY_WEIGHTS) as u8,
            plan: rng.weighted(&PLAN_WEIGHTS) as u8,
            age: (18 + rng.below(22) + rng.below(28)) as u8,
            email_opt_in: rng.chance(0.65),
            busy_until: i64::MIN,
        }
    }

    fn change_a_trait(&mut self, rng: &mut Rng) {
        match rng.below(10) {
            0..=4 => {
                // An upgrade (or a downgrade): any other plan.
                self.plan = ((u64::from(self.plan) + 1 + rng.below(2)) % 3) as u8;
            }
            5..=7 => self.email_opt_in = !self.email_opt_in,
            8 => self.country = rng.weighted(&COUNTRY_WEIGHTS) as u8,
            _ => self.age = self.age.saturating_add(1),
        }
    }

    fn traits(&self, index: u64) -> String {
        let country = COUNTRIES.get(usize::from(self.country)).unwrap_or(&"NL");
        let plan = PLANS.get(usize::from(self.plan)).unwrap_or(&"free");
        format!(
            "\"traits\":{{\"email\":\"user{index}@example.com\",\"country\":\"{country}\",\
             \"plan\":\"{plan}\",\"age\":{},\"email_opt_in\":{}}}",
            self.age, self.email_opt_in
        )
    }
}

#[derive(Debug, Clone, Copy)]
struct Product {
    id: u64,
    category: &'static str,
    price_cents: u64,
}

impl Product {
    /// The product at this popularity rank; attributes are fixed per product (not per seed).
    fn from_rank(rank: u64) -> Self {
        // 7 919 is prime, hence coprime to the catalogue size: a permutation.
        let id = (rank % CATALOG) * 7_919 % CATALOG + 1;
        let h = mix64(id);
        let (category, lo, hi) = CATEGORIES[(h % CATEGORIES.len() as u64) as usize];
        let u = (h >> 16) % 1_000;
        let whole = lo + (hi - lo) * u * u / 1_000_000; // mostly cheap, some dear
        let cents = [99, 49, 0][((h >> 48) % 3) as usize];
        Self {
            id,
            category,
            price_cents: whole * 100 + cents,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Cart {
    id: u64,
    cents: u64,
    items: u64,
}

#[derive(Debug, Clone, Copy)]
struct Campaign {
    id: u64,
    name: &'static str,
    category: &'static str,
}

/// An amount in cents, displayed as a JSON number with two decimals (`59.90`).
struct Money(u64);

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:02}", self.0 / 100, self.0 % 100)
    }
}

fn device_id(seed: u64, index: u64) -> u64 {
    mix64(seed ^ mix64(index.wrapping_add(0x5EED)))
}

// ---------------------------------------------------------------------------------------------
// Randomness and portable math
// ---------------------------------------------------------------------------------------------

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn mix64(x: u64) -> u64 {
    let mut state = x;
    splitmix64(&mut state)
}

/// xoshiro256**.
#[derive(Debug, Clone)]
struct Rng {
    s: [u64; 4],
}

impl Rng {
    fn new(seed: u64) -> Self {
        let mut state = seed;
        Self {
            s: [
                splitmix64(&mut state),
                splitmix64(&mut state),
                splitmix64(&mut state),
                splitmix64(&mut state),
            ],
        }
    }

    fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[0, n)`; 0 when `n` is 0.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `[lo, hi]`, `lo <= hi < u64::MAX`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Exponentially distributed with this mean.
    fn exp(&mut self, mean: f64) -> f64 {
        -det_ln(1.0 - self.unit()) * mean
    }

    /// A uniformly chosen element of a non-empty constant table.
    fn pick<T>(&mut self, items: &[T]) -> T
    where
        T: Copy,
    {
        let i = self.below(items.len() as u64) as usize;
        items[i]
    }

    /// An index chosen with probability proportional to its weight (weights not all 0).
    fn weighted(&mut self, weights: &[u32]) -> usize {
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let mut x = self.below(total);
        for (i, &w) in weights.iter().enumerate() {
            if x < u64::from(w) {
                return i;
            }
            x -= u64::from(w);
        }
        weights.len().saturating_sub(1)
    }
}

/// A rank in `[0, n)` with `P(rank = k)` roughly proportional to `1 / (k + q)`: the inverse CDF
/// of the continuous law `F(x) = ln(1 + x/q) / ln(1 + n/q)`.
fn skewed_rank(rng: &mut Rng, n: u64, q: f64) -> u64 {
    if n <= 1 {
        return 0;
    }
    let ratio = (n as f64 + q) / q;
    let x = q * det_exp(rng.unit() * det_ln(ratio)) - q;
    // `as` saturates, and a tiny negative rounding error becomes 0.
    (x as u64).min(n - 1)
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// A random multiplier in `[1, n)` coprime to `n` (1 when `n <= 2`).
fn coprime_below(rng: &mut Rng, n: u64) -> u64 {
    if n <= 2 {
        return 1;
    }
    let mut m = 1 + rng.below(n - 1);
    while gcd(m, n) != 1 {
        m -= 1;
    }
    m
}

/// Natural logarithm from IEEE basic operations only, so results are identical on every
/// platform. Accurate to a few ulps; `x <= 0` gives -inf, NaN gives NaN.
fn det_ln(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    if x <= 0.0 {
        return f64::NEG_INFINITY;
    }
    if x.is_infinite() {
        return f64::INFINITY;
    }
    let bits = x.to_bits();
    let biased = ((bits >> 52) & 0x7ff) as i64;
    if biased == 0 {
        // Subnormal: scale into the normal range first (2^54 is exact).
        return det_ln(x * 18_014_398_509_481_984.0) - 54.0 * std::f64::consts::LN_2;
    }
    let mut exponent = biased - 1_023;
    let mut m = f64::from_bits((bits & ((1u64 << 52) - 1)) | (1_023u64 << 52)); // [1, 2)
    if m > std::f64::consts::SQRT_2 {
        m /= 2.0;
        exponent += 1;
    }
    // ln(m) = 2 atanh(s) with |s| <= 0.172.
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut term = s;
    let mut sum = 0.0;
    for k in 0..13 {
        sum += term / f64::from(2 * k + 1);
        term *= s2;
    }
    2.0 * sum + exponent as f64 * std::f64::consts::LN_2
}

/// `e^y` from IEEE basic operations only (see [`det_ln`]).
fn det_exp(y: f64) -> f64 {
    if y.is_nan() {
        return f64::NAN;
    }
    if y > 709.0 {
        return f64::INFINITY;
    }
    if y < -745.0 {
        return 0.0;
    }
    let k = (y / std::f64::consts::LN_2).round();
    let r = y - k * std::f64::consts::LN_2; // |r| <= 0.35
    let mut term = 1.0;
    let mut sum = 1.0;
    for i in 1..=20 {
        term *= r / f64::from(i);
        sum += term;
    }
    // Scale by 2^k in two exact steps so that neither factor leaves the normal range.
    let k = k as i64;
    let half = k / 2;
    sum * pow2(half) * pow2(k - half)
}

/// `2^k` for `-1022 <= k <= 1023`.
fn pow2(k: i64) -> f64 {
    f64::from_bits(((k.clamp(-1_022, 1_023) + 1_023) as u64) << 52)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::collections::HashSet;

    fn config(events: u64) -> GeneratorConfig {
        GeneratorConfig {
            customers: 10_000,
            events,
            ..GeneratorConfig::default()
        }
    }

    fn clean(events: u64) -> GeneratorConfig {
        GeneratorConfig {
            late_fraction: 0.0,
            duplicate_fraction: 0.0,
            malformed_fraction: 0.0,
            ..config(events)
        }
    }

    fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y.rem_euclid(400);
        let m = i64::from(m);
        let mp = if m > 2 { m - 3 } else { m + 9 };
        let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    /// Strict RFC 3339 (`YYYY-MM-DDTHH:MM:SS[.fff…](Z|±HH:MM)`) to epoch ms, fraction truncated.
    fn parse_rfc3339(s: &str) -> Option<i64> {
        let b = s.as_bytes();
        let num = |from: usize, len: usize| -> Option<i64> {
            let part = b.get(from..from + len)?;
            if !part.iter().all(u8::is_ascii_digit) {
                return None;
            }
            std::str::from_utf8(part).ok()?.parse().ok()
        };
        if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' {
            return None;
        }
        if b[13] != b':' || b[16] != b':' {
            return None;
        }
        let (y, mo, d) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
        let (h, mi, sec) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
        let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let month_days = [
            31,
            if leap { 29 } else { 28 },
            31,
            30,
            31,
            30,
            31,
            31,
            30,
            31,
            30,
            31,
        ];
        if !(1..=12).contains(&mo) || !(1..=month_days[(mo - 1) as usize]).contains(&d) {
            return None;
        }
        if h > 23 || mi > 59 || sec > 59 {
            return None;
        }
        let mut i = 19;
        let mut millis = 0;
        if b[i] == b'.' {
            i += 1;
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                if i - start < 3 {
                    millis = millis * 10 + i64::from(b[i] - b'0');
                }
                i += 1;
            }
            if i == start {
                return None;
            }
            for _ in (i - start)..3 {
                millis *= 10;
            }
        }
        let offset_min = match b.get(i)? {
            b'Z' | b'z' if i + 1 == b.len() => 0,
            sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
                let (oh, om) = (num(i + 1, 2)?, num(i + 4, 2)?);
                let m = oh * 60 + om;
                if *sign == b'-' {
                    -m
                } else {
                    m
                }
            }
            _ => return None,
        };
        let days = days_from_civil(y, mo as u32, d as u32);
        let local = days * MS_PER_DAY + ((h * 60 + mi) * 60 + sec) * 1_000 + millis;
        Some(local - offset_min * 60_000)
    }

    struct Decoded {
        kind: String,
        name: String,
        customer: String,
        message_id: String,
        ts: i64,
        props: serde_json::Map<String, Value>,
        traits: serde_json::Map<String, Value>,
    }

    /// The input decoding of docs/SEMANTICS.md, plus a required `messageId`.
    fn decode(line: &str) -> Result<Decoded, String> {
        let value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
        let obj = value.as_object().ok_or("not an object")?;
        let kind = obj
            .get("type")
            .and_then(Value::as_str)
            .ok_or("missing type")?;
        let name = match kind {
            "track" => obj
                .get("event")
                .and_then(Value::as_str)
                .filter(|e| !e.is_empty())
                .ok_or("no event name")?
                .to_owned(),
            "page" | "screen" | "identify" => kind.to_owned(),
            other => return Err(format!("unknown type {other:?}")),
        };
        let id = |key: &str| {
            obj.get(key)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
        };
        let customer = id("userId")
            .or_else(|| id("anonymousId"))
            .ok_or("no customer id")?
            .to_owned();
        let message_id = id("messageId").ok_or("no messageId")?.to_owned();
        let ts = match obj.get("timestamp") {
            Some(Value::String(s)) => parse_rfc3339(s).ok_or("bad timestamp")?,
            Some(Value::Number(n)) => n.as_i64().ok_or("bad timestamp")?,
            _ => return Err("bad timestamp".into()),
        };
        let object = |key: &str| match obj.get(key) {
            None => Ok(serde_json::Map::new()),
            Some(Value::Object(map)) => Ok(map.clone()),
            Some(_) => Err(format!("{key} is not an object")),
        };
        Ok(Decoded {
            kind: kind.to_owned(),
            name,
            customer,
            message_id,
            ts,
            props: object("properties")?,
            traits: object("traits")?,
        })
    }

    fn cents(value: Option<&Value>) -> u64 {
        let x = value.and_then(Value::as_f64).expect("a number");
        (x * 100.0).round() as u64
    }

    #[test]
    fn formats_known_instants() {
        assert_eq!(format_rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_rfc3339_ms(1_764_547_200_000),
            "2025-12-01T00:00:00.000Z"
        );
        assert_eq!(
            format_rfc3339_ms(DEFAULT_START_MS),
            "2026-11-01T00:00:00.000Z"
        );
        assert_eq!(
            format_rfc3339_ms(951_782_400_000),
            "2000-02-29T00:00:00.000Z"
        );
        assert_eq!(format_rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(
            format_rfc3339_ms(1_793_527_200_123),
            "2026-11-01T10:00:00.123Z"
        );
        assert_eq!(
            format_rfc3339_ms(253_402_300_799_999),
            "9999-12-31T23:59:59.999Z"
        );
        // Absurd values do not panic.
        let _ = format_rfc3339_ms(i64::MAX);
        let _ = format_rfc3339_ms(i64::MIN);
    }

    #[test]
    fn civil_dates_round_trip() {
        let mut rng = Rng::new(7);
        for _ in 0..20_000 {
            let days = rng.below(2_932_897) as i64 - 719_528; // years 0..=9999
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
            let ms = days * MS_PER_DAY + rng.below(MS_PER_DAY as u64) as i64;
            if y >= 1 {
                assert_eq!(parse_rfc3339(&format_rfc3339_ms(ms)), Some(ms));
            }
        }
    }

    #[test]
    fn offset_stamps_are_the_same_instant() {
        for minutes in OFFSETS {
            let ms = 1_793_527_200_123;
            let event = Pending {
                who: Who::Anonymous(1),
                kind: Kind::Page("Home"),
                channel: Channel::Browser,
                fields: String::new(),
            };
            let line = render(&event, 1, Stamp::Offset(ms, minutes));
            assert_eq!(decode(&line).map(|d| d.ts), Ok(ms), "{line}");
        }
    }

    #[test]
    fn portable_math_matches_std() {
        let mut rng = Rng::new(3);
        for _ in 0..10_000 {
            let x = rng.unit() * 1e6 + 1e-300;
            assert!((det_ln(x) - x.ln()).abs() <= 1e-13 * x.ln().abs().max(1.0));
            let y = rng.unit() * 80.0 - 40.0;
            assert!((det_exp(y) - y.exp()).abs() <= 1e-13 * y.exp());
        }
        assert_eq!(det_ln(1.0), 0.0);
        assert_eq!(det_exp(0.0), 1.0);
        assert!((det_ln(f64::MIN_POSITIVE / 8.0) - (f64::MIN_POSITIVE / 8.0).ln()).abs() < 1e-9);
    }

    #[test]
    fn same_seed_same_lines() {
        let a: Vec<String> = Generator::new(config(5_000)).collect();
        let b: Vec<String> = Generator::new(config(5_000)).collect();
        assert_eq!(a, b);
        let c: Vec<String> = Generator::new(GeneratorConfig {
            seed: 43,
            ..config(5_000)
        })
        .collect();
        assert_ne!(a, c);
    }

    #[test]
    fn yields_exactly_the_requested_count() {
        for events in [0, 1, 2, 17, 1_234] {
            let generator = Generator::new(config(events));
            assert_eq!(
                generator.size_hint(),
                (events as usize, Some(events as usize))
            );
            assert_eq!(generator.count() as u64, events);
        }
        let mut out = Vec::new();
        let written = write_ndjson(Generator::new(config(100)), &mut out);
        assert!(matches!(written, Ok(100)));
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 100);
    }

    #[test]
    fn clean_stream_is_valid_and_in_order() {
        let mut generator = Generator::new(clean(50_000));
        let mut message_ids = HashSet::new();
        let mut last_ts = i64::MIN;
        let mut names = HashSet::new();
        let mut epoch = 0;
        let mut bytes = 0;
        let mut first_seen: HashMap<String, String> = HashMap::new();
        let mut carts: HashMap<String, u64> = HashMap::new();
        let mut orders = 0;
        while let Some(generated) = generator.next_line() {
            let line = &generated.line;
            assert_eq!(generated.kind, LineKind::Event);
            assert!(!line.contains('\n'));
            assert!(line.len() < 400, "{line}");
            bytes += line.len();
            let d = decode(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            assert!(message_ids.insert(d.message_id.clone()), "{line}");
            assert!(d.message_id.starts_with("m-"));
            assert_eq!(d.ts, generated.stream_time_ms);
            assert!(d.ts >= last_ts, "timestamps went back: {line}");
            last_ts = d.ts;
            if line.contains("\"timestamp\":1") {
                epoch += 1;
            }
            names.insert(d.name.clone());
            if d.customer.starts_with("c-") {
                first_seen
                    .entry(d.customer.clone())
                    .or_insert_with(|| d.name.clone());
            } else {
                assert!(d.customer.starts_with("a-"), "{line}");
                assert!(!line.contains("userId"));
            }
            match d.name.as_str() {
                "identify" => {
                    for key in ["country", "plan", "age", "email_opt_in"] {
                        assert!(d.traits.contains_key(key), "{line}");
                    }
                }
                "Product Added" => {
                    let cart = d.props["cart_id"].as_str().expect("cart_id").to_owned();
                    let quantity = d.props["quantity"].as_u64().expect("quantity");
                    *carts.entry(cart).or_default() += cents(d.props.get("price")) * quantity;
                }
                "Order Completed" => {
                    let cart = d.props["cart_id"].as_str().expect("cart_id");
                    assert_eq!(
                        carts.get(cart).copied(),
                        Some(cents(d.props.get("revenue")))
                    );
                    let currency = d.props["currency"].as_str();
                    assert!(matches!(currency, Some("EUR" | "USD")));
                    orders += 1;
                }
                "Email Delivered" | "Email Opened" | "Email Link Clicked" => {
                    assert!(d.props["campaign_id"].is_string());
                }
                _ => {}
            }
            assert!(matches!(
                d.kind.as_str(),
                "track" | "page" | "screen" | "identify"
            ));
        }
        for name in [
            "identify",
            "page",
            "screen",
            "Product Viewed",
            "Product Added",
            "Checkout Started",
            "Order Completed",
            "Email Delivered",
            "Email Opened",
            "Email Link Clicked",
        ] {
            assert!(names.contains(name), "no {name}");
        }
        assert!(orders > 100, "{orders} orders");
        // Every known customer is identified before anything else happens to them.
        assert!(first_seen.values().all(|name| name == "identify"));
        let mean = bytes / 50_000;
        assert!((150..=300).contains(&mean), "mean line length {mean}");
        assert!((1_000..10_000).contains(&epoch), "{epoch} epoch timestamps");
    }

    #[test]
    fn fractions_are_respected() {
        let n = 50_000;
        let mut generator = Generator::new(GeneratorConfig {
            late_fraction: 0.05,
            duplicate_fraction: 0.03,
            malformed_fraction: 0.02,
            ..config(n)
        });
        let mut seen_lines = HashSet::new();
        let mut counted: HashMap<&str, u64> = HashMap::new();
        let mut malformations = HashSet::new();
        let mut max_ts = i64::MIN;
        while let Some(g) = generator.next_line() {
            let decoded = decode(&g.line);
            let first = seen_lines.insert(g.line.clone());
            match g.kind {
                LineKind::Duplicate => {
                    assert!(!first, "duplicate of nothing: {}", g.line);
                    assert!(decoded.is_ok());
                    *counted.entry("duplicate").or_default() += 1;
                }
                LineKind::Malformed(how) => {
                    assert!(first);
                    assert!(decoded.is_err(), "{how:?} decodes: {}", g.line);
                    malformations.insert(how);
                    *counted.entry("malformed").or_default() += 1;
                }
                LineKind::Late | LineKind::Event => {
                    assert!(first);
                    let d = decoded.unwrap_or_else(|e| panic!("{e}: {}", g.line));
                    let behind = g.stream_time_ms - d.ts;
                    if g.kind == LineKind::Late {
                        assert!((1_000..=600_000).contains(&behind), "{behind}");
                    } else {
                        assert_eq!(behind, 0);
                    }
                    // Independently of the kind: late means older than something already seen.
                    if d.ts < max_ts {
                        assert!(max_ts - d.ts <= 600_000);
                        *counted.entry("late").or_default() += 1;
                    }
                    max_ts = max_ts.max(d.ts);
                }
            }
        }
        let stats = generator.stats();
        assert_eq!(stats.lines, n);
        assert_eq!(
            stats.on_time + stats.late + stats.duplicates + stats.malformed,
            n
        );
        assert_eq!(counted.get("duplicate").copied(), Some(stats.duplicates));
        assert_eq!(counted.get("malformed").copied(), Some(stats.malformed));
        let late = counted.get("late").copied().unwrap_or(0);
        assert!(late.abs_diff(stats.late) <= stats.late / 100, "{late}");
        let near = |count: u64, fraction: f64| {
            let expected = n as f64 * fraction;
            (count as f64 - expected).abs() < expected * 0.15
        };
        assert!(near(stats.late, 0.05), "{stats:?}");
        assert!(near(stats.duplicates, 0.03), "{stats:?}");
        assert!(near(stats.malformed, 0.02), "{stats:?}");
        assert_eq!(malformations.len(), 5);
    }

    #[test]
    fn activity_is_skewed_with_a_long_tail() {
        // 100 000 lines at 5/s span 5.5 h: enough time for heavy customers to return often (a
        // customer rarely runs two sessions at once).
        let mut per_customer: HashMap<String, u64> = HashMap::new();
        let config = GeneratorConfig {
            events_per_second: 5.0,
            ..clean(100_000)
        };
        for line in Generator::new(config) {
            if let Ok(d) = decode(&line) {
                if d.customer.starts_with("c-") {
                    *per_customer.entry(d.customer).or_default() += 1;
                }
            }
        }
        let mut counts: Vec<u64> = per_customer.values().copied().collect();
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let total: u64 = counts.iter().sum();
        let top: u64 = counts.iter().take(100).sum(); // top 1 % of 10 000
        assert!(top * 100 > total * 15, "top 1 %: {top} of {total}");
        assert!(counts.len() > 3_000, "{} distinct customers", counts.len());
        let light = counts.iter().filter(|&&c| c <= 10).count();
        assert!(light > 1_000, "{light} light customers");
    }

    #[test]
    fn email_arrives_in_bursts() {
        let lines: Vec<String> = Generator::new(clean(30_000)).collect();
        let delivered: Vec<bool> = lines
            .iter()
            .map(|l| l.contains("\"event\":\"Email Delivered\""))
            .collect();
        let total = delivered.iter().filter(|&&d| d).count();
        assert!(total > 50, "{total} deliveries");
        let densest = delivered
            .windows(100)
            .map(|w| w.iter().filter(|&&d| d).count())
            .max()
            .unwrap_or(0);
        assert!(densest >= 30, "densest 100 lines hold {densest} deliveries");
    }

    #[test]
    fn absurd_configs_do_not_panic() {
        let configs = [
            GeneratorConfig {
                customers: 0,
                events: 2_000,
                events_per_second: 0.0,
                late_fraction: f64::NAN,
                duplicate_fraction: 2.0,
                malformed_fraction: -1.0,
                ..GeneratorConfig::default()
            },
            GeneratorConfig {
                customers: 1,
                events: 2_000,
                events_per_second: f64::INFINITY,
                ..GeneratorConfig::default()
            },
            GeneratorConfig {
                customers: u64::MAX,
                events: 2_000,
                start_ms: i64::MAX - 10,
                events_per_second: 1e-300,
                late_fraction: 0.5,
                malformed_fraction: 0.5,
                ..GeneratorConfig::default()
            },
            GeneratorConfig {
                customers: 3,
                events: 20_000,
                start_ms: i64::MIN,
                events_per_second: 1e9,
                ..GeneratorConfig::default()
            },
        ];
        for config in configs {
            let generator = Generator::new(config.clone());
            assert_eq!(generator.count() as u64, config.events, "{config:?}");
        }
        assert_eq!(
            approx_end_ms(&GeneratorConfig {
                events: 500,
                events_per_second: 50.0,
                ..GeneratorConfig::default()
            }),
            DEFAULT_START_MS + 10_000
        );
        assert_eq!(Generator::customer_id(42), "c-42");
    }
}
